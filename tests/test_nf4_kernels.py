"""Fused 4-bit GEMM kernels under Triton's interpreter vs the chunked PyTorch twin and fp64.

Criterion (per output): max|kernel - fp64| <= 2 max|reference - fp64| + atol; fp64 uses the same
dequantized W (4-bit decoding is exact in fp32), outputs are NaN-poisoned before the kernels write them.
"""

from __future__ import annotations

import os

import pytest
import torch
from twice_rule import check_2x as _check

from lora_triton.nn.nf4_linear import NF4Linear
from lora_triton.reference import nf4 as ref

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)

kern = pytest.importorskip("lora_triton.kernels.nf4")

# (M, K, N, r, blocksize): M=1, r=1, K odd (blocks straddle rows, odd nibble starts), N off the tile grid,
# K a multiple of the blocksize (one absmax per W row of a tile)
SHAPES = [(1, 33, 7, 1, 64), (13, 70, 45, 3, 32), (40, 64, 50, 16, 128), (5, 128, 24, 2, 64)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kern, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m,k,n,r,blocksize", SHAPES)
def test_fused_fwd_and_dgrad_match_reference_and_fp64(m, k, n, r, blocksize, double_quant, dtype):
    _compare(m, k, n, r, blocksize, double_quant, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,r,blocksize", [s for s in SHAPES if s[0] <= 16])
def test_small_m_forward_on_the_gemm_path_too(monkeypatch, m, k, n, r, blocksize, dtype):
    # M <= 16 takes the split-K GEMV above; the tiled GEMM must stay right for small M as well
    monkeypatch.setattr(kern, "GEMV_MAX_M", 0)
    _compare(m, k, n, r, blocksize, True, dtype, dgrad=False)


@pytest.mark.parametrize("m,k,n,r,blocksize,split", [(1, 256, 20, 1, 64, 8), (16, 96, 33, 5, 32, 3),
                                                     (7, 65, 17, 2, 64, 3), (2, 64, 40, 16, 128, 1)])
def test_decode_gemv_across_k_splits(monkeypatch, m, k, n, r, blocksize, split):
    # split-K GEMV: one BLOCK_K (32) per split at most, ragged last split, odd K (bytes straddle rows),
    # K = one block with tiles spanning several absmaxes (BLOCK_K 64 over blocksize 32 is the other case)
    monkeypatch.setattr(kern, "gemv_split", lambda *a: split)
    _compare(m, k, n, r, blocksize, True, torch.float32, dgrad=False)
    monkeypatch.setattr(kern, "_GEMV_INTERP", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64))
    _compare(m, k, n, r, 32, False, torch.float16, dgrad=False)


def test_tiles_spanning_several_absmax_blocks(monkeypatch):
    # GPU tiles (64 wide) over blocksize 32: several absmaxes per W row of a tile, decoded and broadcast
    monkeypatch.setattr(kern.at, "interp_meta", lambda family: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2))
    _compare(3, 128, 70, 2, 32, True, torch.float32)
    _compare(3, 128, 70, 2, 32, False, torch.float16)


def _compare(m, k, n, r, blocksize, double_quant, dtype, dgrad=True):
    g = torch.Generator().manual_seed(m * 100 + k)
    layer = NF4Linear.from_weight(torch.randn(n, k, generator=g) / k**0.5, blocksize=blocksize,
                                  double_quant=double_quant)
    w = layer.nf4_weight()
    w64 = layer.dequantize(torch.float32).double()
    x, bias = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    u, lora_b = torch.randn(m, r, generator=g).to(dtype), (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    dy, lora_a = torch.randn(m, n, generator=g).to(dtype), (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    s = 0.75
    for use_bias, use_lora in ((True, True), (False, False)):
        b_, u_, lb_ = (bias if use_bias else None), (u if use_lora else None), (lora_b if use_lora else None)
        y = kern.nf4_linear_fwd(x, w, b_, u_, lb_, s)
        y_ref = ref.nf4_linear_fwd(x, w, b_, u_, lb_, s)
        y64 = x.double() @ w64.t()
        if use_bias:
            y64 = y64 + bias.double()
        if use_lora:
            y64 = y64 + s * u.double() @ lora_b.double().t()
        _check("y", y, y_ref, y64, dtype)
        if not dgrad:
            continue
        du_, la_ = (u if use_lora else None), (lora_a if use_lora else None)
        dx = kern.nf4_linear_dgrad(dy, w, du_, la_)
        dx_ref = ref.nf4_linear_dgrad(dy, w, du_, la_)
        dx64 = dy.double() @ w64 + (u.double() @ lora_a.double() if use_lora else 0.0)
        _check("dx", dx, dx_ref, dx64, dtype)


def test_op_on_triton_backend_matches_reference_backend(monkeypatch):
    from lora_triton.ops.nf4_linear import nf4_lora_linear

    g = torch.Generator().manual_seed(5)
    layer = NF4Linear.from_weight(torch.randn(20, 40, generator=g) / 6, torch.randn(20, generator=g))
    x = torch.randn(9, 40, generator=g)
    a, b = torch.randn(2, 40, generator=g) * 0.2, torch.randn(20, 2, generator=g) * 0.2
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        y = nf4_lora_linear(xs, layer.nf4_weight(), layer.bias, as_, bs, 2.0, 0.25, seed=77)
        y.backward(torch.ones_like(y))
        results[backend] = (y, xs.grad, as_.grad, bs.grad)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kernel_rejects_bad_operands():
    layer = NF4Linear.from_weight(torch.randn(8, 32))
    with pytest.raises(ValueError, match="x must be"):
        kern.nf4_linear_fwd(torch.randn(2, 31), layer.nf4_weight(), None, None, None, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        kern.nf4_linear_dgrad(torch.randn(2, 8), layer.nf4_weight(), torch.randn(2, 3), torch.randn(3, 30))


def test_device_check_script_runs_tiny_under_the_interpreter(tmp_path, monkeypatch):
    # the script sets these for its process; set here, they are restored for the tests that follow
    for key, value in (("TRITON_INTERPRET", "1"), ("LORA_TRITON_BACKEND", "triton"), ("LORA_TRITON_AUTOTUNE", "0")):
        monkeypatch.setenv(key, value)
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "device_check_nf4.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--self-test", "--out", str(tmp_path)]) == 0
    import json

    doc = json.loads((tmp_path / "nf4.json").read_text())
    assert doc["checks"] and all(c["ok"] for c in doc["checks"])
    assert [r["path"] for r in doc["rows"]] == ["gemv", "gemm"] and "gemm_path_fwd_s" in doc["rows"][0]
