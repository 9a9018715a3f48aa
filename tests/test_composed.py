"""The composed path (base GEMMs on torch/cuBLAS, LoRA through our side kernels) and the path choice
(``LORA_TRITON_PATH``, the measured auto decision and its cache), under Triton's interpreter.

Criterion as for the fused kernels: max|path - fp64| <= 2 max|reference - fp64| + atol for y, u,
dx, dA, dB, with the reference in the same precision and the same mask.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from twice_rule import check_lora_linear

from lora_triton.ops import backend

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)

kern = pytest.importorskip("lora_triton.kernels.lora_linear")
composed = pytest.importorskip("lora_triton.kernels.composed")
path_choice = pytest.importorskip("lora_triton.kernels.path_choice")

# (M, K, N, r, weight mode, bias, x non-contiguous)
CASES = [(1, 100, 33, 1, "plain", True, False), (37, 70, 50, 3, "transposed", False, True),
         (70, 40, 45, 64, "none", True, False), (5, 48, 20, 256, "plain", False, False),
         (21, 64, 40, 16, "none", False, True)]


def _case(m, k, n, r, w_mode, bias, x_noncontig, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * m + k + r)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(m, 2 * k)[:, ::2] if x_noncontig else rnd(m, k)
    w = {"plain": lambda: rnd(n, k) / k**0.5, "transposed": lambda: (rnd(k, n) / k**0.5).t(),
         "none": lambda: None}[w_mode]()
    c = dict(x=x, w=w, b=rnd(n) if bias else None, a=rnd(r, k) / k**0.5, bb=rnd(n, r) / r**0.5, dy=rnd(m, n))
    return {key: None if t is None else t.to(dtype) for key, t in c.items()}




def _poison(monkeypatch):
    nan = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype)
    monkeypatch.setattr(kern, "_empty", nan)
    monkeypatch.setattr(composed, "_empty", nan)


def _outputs(c, p, seed_t, fwd_path, bwd_path, monkeypatch):
    x, w, b, a, bb, dy = c["x"], c["w"], c["b"], c["a"], c["bb"], c["dy"]
    monkeypatch.setenv("LORA_TRITON_PATH", fwd_path)
    y, u = kern.lora_linear_fwd(x, w, b, a, bb, 0.75, p, seed_t)
    monkeypatch.setenv("LORA_TRITON_PATH", bwd_path)
    return (y, u, *kern.lora_linear_bwd(dy, x, w, a, bb, u, 0.75, p, seed_t, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"M{c[0]}K{c[1]}N{c[2]}r{c[3]}{c[4]}" for c in CASES])
def test_composed_matches_reference(idx, p, dtype, monkeypatch):
    _poison(monkeypatch)
    c = _case(*CASES[idx], dtype)
    seed_t = torch.tensor([777 + idx], dtype=torch.int64) if p > 0 else None
    got = _outputs(c, p, seed_t, "composed", "composed", monkeypatch)
    check_lora_linear(got, c, 0.75, p, seed_t, dtype)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == torch.float32


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_paths_agree_and_mix(p, monkeypatch):
    """Same mask stream on both paths: fused forward + composed backward (and the reverse) equal
    either path run alone, within fp32 rounding."""
    c = _case(29, 48, 40, 5, "plain", True, False, torch.float32)
    seed_t = torch.tensor([99], dtype=torch.int64) if p > 0 else None
    runs = {(f, b): _outputs(c, p, seed_t, f, b, monkeypatch) for f, b in
            [("fused", "fused"), ("composed", "composed"), ("fused", "composed"), ("composed", "fused")]}
    base = runs[("fused", "fused")]
    for outs in runs.values():
        for got, want in zip(outs, base):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_PATH", "fastest")
    with pytest.raises(ValueError, match=r"LORA_TRITON_PATH must be one of \('auto', 'fused', 'composed'\), got "
                                         r"'fastest'"):
        backend.requested_path()
    c = _case(4, 16, 8, 2, "plain", True, False, torch.float32)
    with pytest.raises(ValueError, match="LORA_TRITON_PATH"):
        kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.0, None)
    monkeypatch.setenv("LORA_TRITON_PATH", " Composed ")
    assert backend.requested_path() == "composed"
    monkeypatch.delenv("LORA_TRITON_PATH")
    assert backend.requested_path() == "auto"


def test_auto_is_fused_without_a_gpu_measurement(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_PATH", "auto")
    c = _case(4, 16, 8, 2, "plain", True, False, torch.float32)
    args = (c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.0, None)
    monkeypatch.setattr(path_choice, "decide", lambda *a, **k: pytest.fail("measured on CPU"))
    assert path_choice.pick("fwd", c["x"], c["w"], c["a"], c["bb"], 0.0, args) == "fused"
    monkeypatch.setenv("LORA_TRITON_PATH", "composed")
    assert path_choice.pick("fwd", c["x"], c["w"], c["a"], c["bb"], 0.0, args) == "composed"


def test_auto_decision_measures_once_and_is_cached_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(path_choice, "_MEMO", {})
    calls = []
    fake_us = {"fused": 120.0, "composed": 100.0}

    def timer(fn):
        calls.append(fn())
        return fake_us[calls[-1]]

    runners = {"fused": lambda: "fused", "composed": lambda: "composed"}
    key = path_choice.key("fwd", torch.zeros(300, 64, dtype=torch.float16), object(), torch.zeros(3, 64),
                          torch.zeros(40, 3), 0.1)
    assert key == "fwd|float16|M512|N40|K64|r16|p1|w1"
    assert path_choice.decide("GPU A/1", key, runners, timer) == "composed"
    assert path_choice.decide("GPU A/1", key, runners, timer) == "composed" and len(calls) == 2
    saved = json.loads((tmp_path / "paths-GPU_A_1.json").read_text())
    assert saved[key] == {"path": "composed", "us": {"fused": 120.0, "composed": 100.0}}
    # Another GPU model measures for itself; a fresh process reads the file instead of measuring.
    fake_us.update(fused=80.0)
    assert path_choice.decide("GPU B", key, runners, timer) == "fused" and len(calls) == 4
    monkeypatch.setattr(path_choice, "_MEMO", {})
    assert path_choice.decide("GPU A/1", key, runners, lambda fn: pytest.fail("re-measured")) == "composed"


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_through_op_with_autograd(path, monkeypatch):
    from lora_triton.ops import lora_linear

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 7, 40, generator=g)
    w, b = torch.randn(24, 40, generator=g) / 7, torch.randn(24, generator=g)
    a0, b0 = torch.randn(6, 40, generator=g) * 0.2, torch.randn(24, 6, generator=g) * 0.2
    gy = torch.randn(2, 7, 24, generator=g)
    results = {}
    for backend_name in ("triton", "reference"):
        monkeypatch.setenv("LORA_TRITON_BACKEND", backend_name)
        monkeypatch.setenv("LORA_TRITON_PATH", path)
        x, a, bb = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        y = lora_linear(x, w, b, a, bb, 0.5, 0.2, seed=4321)
        y.backward(gy)
        results[backend_name] = (y.detach(), x.grad, a.grad, bb.grad)
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
