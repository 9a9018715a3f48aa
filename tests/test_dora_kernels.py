"""DoRA Triton kernels under the interpreter vs the PyTorch reference and fp64 ground truth.

Criterion (every output and gradient): max|kernel - fp64| <= 2 max|reference - fp64| + atol, the
reference in the kernel's precision, fp64 with the same seed (the same mask). Outputs are NaN-filled
before the kernels write them, so an element a kernel misses fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch
from twice_rule import check_2x as _check

from lora_triton.reference import dora as ref

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)

kern = pytest.importorskip("lora_triton.kernels.dora")

# (M, K, N, r): M = 1, r = 1, sizes off the 16-grid, several blocks along every axis.
SHAPES = [(1, 20, 9, 1), (19, 40, 33, 3), (33, 17, 20, 8)]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(kern, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))


def _case(m, k, n, r, dtype, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed + 100 * m + k)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    w = (rnd(k, n) / k**0.5).t() if transposed else rnd(n, k) / k**0.5  # GPT-2 Conv1D: a transposed view
    a, b = rnd(r, k) / k**0.5, rnd(n, r) * 0.3
    norm = (w + 1.5 * b @ a).norm(dim=1)
    mag = norm * (1 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64))
    c = dict(x=rnd(m, k), w=w, bias=rnd(n), a=a, b=b, mag=mag, dy=rnd(m, n))
    return {key: v.to(dtype) if key != "mag" else v.float() for key, v in c.items()}



def _run(impl, c, s, p, seed):
    sq = impl.dora_weight_sq(c["w"])
    norm = impl.dora_weight_norm(c["w"], c["a"], c["b"], s, sq)
    y, u, y_pre = impl.dora_linear_fwd(c["x"], c["w"], c["bias"], c["a"], c["b"], c["mag"], norm, s, p, seed)
    dx, d_a, d_b, d_m = impl.dora_linear_bwd(c["dy"], c["x"], c["w"], c["a"], c["b"], c["mag"], norm, u, y_pre, s,
                                             p, seed, True)
    return dict(sq=sq, norm=norm, y=y, u=u, y_pre=y_pre, dx=dx, dA=d_a, dB=d_b, dm=d_m)


@pytest.mark.parametrize("m, k, n, r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_kernels_match_reference_and_fp64(m, k, n, r, dtype, p):
    c = _case(m, k, n, r, dtype, transposed=(m == 19))
    seed = torch.tensor([987654321 + m], dtype=torch.int64) if p else None
    got = _run(kern, c, 1.5, p, seed)
    same = _run(ref, c, 1.5, p, seed)
    c64 = {key: v.double() for key, v in c.items()}
    truth = _run(ref, c64, 1.5, p, seed)
    for name in got:
        _check(name, got[name], same[name], truth[name], dtype)


def test_kernels_through_the_op_and_autograd(monkeypatch):
    """LORA_TRITON_BACKEND=triton: ops.dora_linear runs the kernels, gradients agree with the reference."""
    from lora_triton.ops.dora import dora_linear

    c = _case(9, 24, 18, 2, torch.float32)
    leaves = {key: c[key].clone().requires_grad_(True) for key in ("x", "a", "b", "mag")}
    out = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
        y = dora_linear(leaves["x"], c["w"], c["bias"], leaves["a"], leaves["b"], leaves["mag"], 1.5, 0.25, 42)
        out[backend] = [y, *torch.autograd.grad(y, list(leaves.values()), c["dy"])]
    for got, want in zip(out["triton"], out["reference"]):
        assert (got - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item())


def test_device_check_script_logic_on_tiny_shapes(tmp_path):
    """bench/device_check_dora.py (the GPU check) runs end to end on CPU through the interpreter."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "device_check_dora.py"
    spec = importlib.util.spec_from_file_location("device_check_dora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--small", "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "dora.json").read_text())
    assert doc["rows"] and all(row["ok"] for row in doc["rows"])
