"""The pure-PyTorch op (reference backend) vs an fp64 ground truth: y, dx, dA, dB over odd shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from twice_rule import fp16_matmul_ok

import lora_triton
from lora_triton.reference import lora_linear as ref
from lora_triton.reference.philox import dropout_keep_mask

DTYPES = [torch.float32, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not fp16_matmul_ok(), reason="no fp16 matmul on this CPU")), torch.bfloat16]
# max|err| / (max|truth| + 1), per dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def _make(lead, k, n, r, *, w_mode="plain", bias=True, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rnd(*lead, 2 * k)[..., ::2] if noncontig else rnd(*lead, k)
    if w_mode == "plain":
        w = rnd(n, k) / k**0.5
    elif w_mode == "conv1d":  # Conv1D stores [in, out]; the op gets the transposed view
        w = (rnd(k, n) / k**0.5).t()
    else:
        w = None
    b = rnd(n) if bias else None
    a = rnd(r, k) / k**0.5
    bb = rnd(n, r) / r**0.5
    dy = rnd(*lead, n)
    return x, w, b, a, bb, dy


def _truth(x, w, b, a, bb, dy, s, p, seed):
    """fp64, autograd through an explicit mask."""
    x, a, bb = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    k = x.shape[-1]
    xd = x
    if p > 0:
        keep = dropout_keep_mask(seed, x.numel() // k, k, p).reshape(x.shape)
        xd = x * keep / (1 - p)
    y = s * (xd @ a.t()) @ bb.t()
    if w is not None:
        y = y + x @ w.t()
    if b is not None:
        y = y + b
    dx, da, db = torch.autograd.grad(y, (x, a, bb), dy)
    return y.detach(), dx, da, db


def _check(dtype, x, w, b, a, bb, dy, s, p, seed):
    want = _truth(x, w, b, a, bb, dy, s, p, seed)
    cast = lambda t: None if t is None else t.to(dtype)
    xc = cast(x).requires_grad_()
    # fp32 adapters on a low-precision base, as LoraLinear keeps them.
    ac, bc = (t.float().requires_grad_() for t in (a, bb))
    y = lora_triton.lora_linear(xc, cast(w), cast(b), ac, bc, s, p, seed=seed if p > 0 else None)
    assert y.dtype == dtype and y.shape == dy.shape
    got = (y, *torch.autograd.grad(y, (xc, ac, bc), cast(dy)))
    assert got[1].dtype == dtype and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, g_, w_ in zip(("y", "dx", "dA", "dB"), got, want):
        assert g_.shape == w_.shape, name
        err = (g_.double() - w_).abs().max().item() / (w_.abs().max().item() + 1.0)
        assert err <= TOL[dtype], f"{name} {dtype}: relative error {err:.3g}"


CASES = {
    "M=1": dict(lead=(1,), k=7, n=5, r=3),
    "r=1": dict(lead=(6,), k=9, n=4, r=1),
    "lead-dims": dict(lead=(2, 3, 4), k=10, n=6, r=2),
    "noncontig": dict(lead=(5,), k=12, n=7, r=4, noncontig=True),
    "conv1d": dict(lead=(2, 5), k=8, n=11, r=2, w_mode="conv1d"),
    "lora-only": dict(lead=(4,), k=6, n=9, r=3, w_mode="none", bias=False),
    "lora-only-bias": dict(lead=(3,), k=6, n=9, r=3, w_mode="none"),
    "no-bias": dict(lead=(8,), k=33, n=17, r=5, bias=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_reference_op_vs_fp64(case, dtype, p):
    spec = dict(CASES[case])
    lead, k, n, r = spec.pop("lead"), spec.pop("k"), spec.pop("n"), spec.pop("r")
    tensors = _make(lead, k, n, r, seed=len(case), **spec)
    _check(dtype, *tensors, 1.5, p, 2**33 + 5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(1, 24), n=st.integers(1, 24),
       r=st.integers(1, 6), w_mode=st.sampled_from(["plain", "conv1d", "none"]), bias=st.booleans(),
       noncontig=st.booleans(), p=st.sampled_from([0.0, 0.1, 0.6]), seed=st.integers(0, 2**63 - 1),
       scale=st.floats(0.1, 4.0))
def test_reference_op_hypothesis_fp32(lead, k, n, r, w_mode, bias, noncontig, p, seed, scale):
    tensors = _make(tuple(lead), k, n, r, w_mode=w_mode, bias=bias, noncontig=noncontig, seed=k * n + r)
    _check(torch.float32, *tensors, scale, p, seed)


def test_reference_functions_contract():
    """The raw twin: u = D(x) A^T unscaled, dA/dB fp32, need_dx=False gives None."""
    x, w, b, a, bb, dy = (t.float() if t is not None else None for t in _make((7,), 10, 6, 3, seed=1))
    seed = torch.tensor([123], dtype=torch.int64)
    y, u = ref.lora_linear_fwd(x, w, b, a, bb, 2.0, 0.3, seed)
    keep = dropout_keep_mask(seed, 7, 10, 0.3)
    torch.testing.assert_close(u, (x * keep / 0.7) @ a.t(), rtol=1e-5, atol=1e-5)
    dx, da, db = ref.lora_linear_bwd(dy, x, w, a, bb, u, 2.0, 0.3, seed, need_dx=False)
    assert dx is None and da.dtype == torch.float32 and db.shape == bb.shape
    dx, _, _ = ref.lora_linear_bwd(dy, x, w, a, bb, u, 2.0, 0.3, seed, need_dx=True)
    assert dx.shape == x.shape


def test_frozen_base_gets_no_grad_and_trainable_base_does():
    x, w, b, a, bb, dy = (t.float() for t in _make((5,), 8, 4, 2, seed=3))
    a.requires_grad_()
    bb.requires_grad_()
    y = lora_triton.lora_linear(x, w, b, a, bb, 1.0)
    y.backward(dy)
    assert a.grad is not None and bb.grad is not None and w.grad is None and x.grad is None
    w.requires_grad_()
    b.requires_grad_()
    y = lora_triton.lora_linear(x, w, b, a, bb, 1.0)
    dw, db_ = torch.autograd.grad(y, (w, b), dy)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db_, dy.sum(0), rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    x, w, b, a, bb, _ = _make((3,), 5, 4, 2, seed=4)
    for t in (x, a, bb):
        t.requires_grad_()
    fn = lambda x_, a_, b_: lora_triton.lora_linear(x_, w, b, a_, b_, 0.7, 0.4, seed=99)
    assert torch.autograd.gradcheck(fn, (x, a, bb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapter_grads_not_rounded_to_x_dtype(dtype, monkeypatch):
    """fp32 adapters on a half-precision base: dA/dB arrive exactly as the backend's fp32 values."""
    real_bwd = ref.lora_linear_bwd
    returned = {}

    def bwd_fp32_bits(*args, **kwargs):  # like the kernels: fp32 values that x's dtype cannot hold
        dx, da, db = real_bwd(*args, **kwargs)
        returned["a"], returned["b"] = da * (1 + 2**-20), db * (1 + 2**-20)
        return dx, returned["a"], returned["b"]

    monkeypatch.setattr(ref, "lora_linear_bwd", bwd_fp32_bits)
    x, w, b, a, bb, dy = (t.to(dtype) for t in _make((16,), 24, 12, 4, seed=6))
    a32, b32 = a.float().requires_grad_(), bb.float().requires_grad_()
    y = lora_triton.lora_linear(x, w, b, a32, b32, 1.3, 0.2, seed=5)
    da, db = torch.autograd.grad(y, (a32, b32), dy)
    assert da.dtype == db.dtype == torch.float32
    assert torch.equal(da, returned["a"]) and torch.equal(db, returned["b"])
