"""Fused LoRA kernels under Triton's interpreter vs the PyTorch reference and fp64 ground truth.

Criterion (per output): max|kernel - fp64| <= 2 max|reference - fp64| + atol, where the
reference runs in the kernel's precision and fp64 uses the same seed, hence the same mask.
"""

from __future__ import annotations

import os

import pytest
import torch
from twice_rule import check_2x as _check
from twice_rule import lora_linear_refs

from lora_triton.reference.philox import apply_dropout

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)

kern = pytest.importorskip("lora_triton.kernels.lora_linear")


# (M, K, N, r): M=1, odd M, K/N off the block grid, r from 1 to 256; some shapes hit split-K
# in the shrink (tiny M, several K blocks) and split-M in dA (one K block, several M blocks).
SHAPES = [(1, 100, 33, 1), (37, 70, 50, 3), (70, 40, 45, 64), (64, 64, 64, 16), (5, 48, 20, 256)]


def _case(m, k, n, r, dtype, *, w_mode="plain", bias=True, x_noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * m + k)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(m, 2 * k)[:, ::2] if x_noncontig else rnd(m, k)  # stride (2K, 2)
    if w_mode == "plain":
        w = rnd(n, k) / k**0.5
    elif w_mode == "transposed":  # GPT-2 Conv1D stores [K, N]; the op sees its transposed view
        w = (rnd(k, n) / k**0.5).t()
    else:
        w = None
    b = rnd(n) if bias else None
    a = rnd(r, k) / k**0.5
    bb = rnd(n, r) / r**0.5
    dy = rnd(m, n)
    cast = lambda t: None if t is None else t.to(dtype)
    return dict(x=cast(x), w=cast(w), b=cast(b), a=cast(a), bb=cast(bb), dy=cast(dy))




def _run_all(c, scaling, p, seed_t, need_dx=True):
    x, w, b, a, bb, dy = c["x"], c["w"], c["b"], c["a"], c["bb"], c["dy"]
    y, u = kern.lora_linear_fwd(x, w, b, a, bb, scaling, p, seed_t)
    g = kern.lora_linear_bwd(dy, x, w, a, bb, u, scaling, p, seed_t, need_dx)
    return ((y, u, *g), *lora_linear_refs(c, scaling, p, seed_t, need_dx))


VARIANTS = [
    dict(w_mode="plain", bias=True, x_noncontig=False),
    dict(w_mode="transposed", bias=False, x_noncontig=True),
    dict(w_mode="none", bias=True, x_noncontig=False),
    dict(w_mode="plain", bias=False, x_noncontig=True),
    dict(w_mode="transposed", bias=True, x_noncontig=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("idx", range(len(SHAPES)), ids=[f"M{s[0]}K{s[1]}N{s[2]}r{s[3]}" for s in SHAPES])
def test_fwd_bwd_matches_reference(idx, p, dtype):
    m, k, n, r = SHAPES[idx]
    variant = VARIANTS[(idx + (p > 0)) % len(VARIANTS)]
    c = _case(m, k, n, r, dtype, **variant)
    seed_t = torch.tensor([987654321 + idx], dtype=torch.int64) if p > 0 else None
    got, refv, truth = _run_all(c, 0.75, p, seed_t)
    for name, gv, rv, tv in zip(("y", "u", "dx", "dA", "dB"), got, refv, truth):
        _check(name, gv, rv, tv, dtype)
    assert got[3].dtype == torch.float32 and got[4].dtype == torch.float32
    assert got[0].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_mask_same_as_reference(dtype):
    # u = D(x) A^T with the reference mask; a different mask would move u by O(1).
    m, k, r = 9, 70, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g).to(dtype)
    bb = torch.randn(7, r, generator=g).to(dtype)
    seed_t = torch.tensor([2**40 + 17], dtype=torch.int64)
    _, u = kern.lora_linear_fwd(x, None, None, a, bb, 1.0, 0.5, seed_t)
    want = apply_dropout(x.double(), seed_t, 0.5) @ a.double().t()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(u.double(), want, rtol=tol, atol=tol * 4)
    # Identity A (r = K) exposes D(x) itself: zeros exactly where the reference drops.
    eye = torch.eye(16, dtype=dtype)
    x16 = x[:, :16].contiguous()
    _, u = kern.lora_linear_fwd(x16, None, None, eye, torch.ones(3, 16, dtype=dtype), 1.0, 0.5, seed_t)
    assert torch.equal(u == 0, apply_dropout(x16, seed_t, 0.5) == 0)


def test_split_paths_are_exercised():
    dev = torch.device("cpu")
    assert kern._split(1, 4, dev) > 1  # shrink of SHAPES[0]: M=1, 4 K blocks
    assert kern._split(2, 3, dev) > 1  # dA of SHAPES[2]: 2 K blocks, 3 M blocks


def test_need_dx_false_and_seed_changes_mask():
    c = _case(20, 40, 24, 4, torch.float32)
    s1, s2 = torch.tensor([1], dtype=torch.int64), torch.tensor([2], dtype=torch.int64)
    dx, d_a, d_b = kern.lora_linear_bwd(c["dy"], c["x"], c["w"], c["a"], c["bb"],
                                        torch.randn(20, 4), 0.5, 0.3, s1, False)
    assert dx is None and d_a.shape == (4, 40) and d_b.shape == (24, 4)
    y1, _ = kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.3, s1)
    y2, _ = kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.3, s2)
    y1b, _ = kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.3, s1)
    assert torch.equal(y1, y1b) and not torch.equal(y1, y2)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_every_output_element_written(monkeypatch, p):
    # Outputs come from kern._empty; poison them with NaN and check nothing survives.
    monkeypatch.setattr(kern, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))
    for m, k, n, r in [(1, 100, 33, 1), (70, 40, 45, 3), (33, 65, 31, 17)]:
        c = _case(m, k, n, r, torch.float32)
        seed_t = torch.tensor([5], dtype=torch.int64) if p > 0 else None
        y, u = kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 0.5, p, seed_t)
        outs = (y, u, *kern.lora_linear_bwd(c["dy"], c["x"], c["w"], c["a"], c["bb"], u, 0.5, p, seed_t, True))
        for name, t in zip(("y", "u", "dx", "dA", "dB"), outs):
            assert not torch.isnan(t).any(), f"{name} has unwritten elements for {(m, k, n, r)}"


def test_rejects_bad_inputs():
    c = _case(4, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError):
        kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 1.0, 0.1, None)
    with pytest.raises(ValueError):
        kern.lora_linear_fwd(c["x"], c["w"], c["b"], torch.randn(300, 16), torch.randn(8, 300), 1.0, 0.0, None)
    with pytest.raises(TypeError):
        kern.lora_linear_fwd(c["x"], c["w"].double(), c["b"], c["a"], c["bb"], 1.0, 0.0, None)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_through_op_with_leading_dims(monkeypatch, p, dtype):
    from lora_triton.ops import lora_linear

    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 3, 5, 40, generator=g).to(dtype)
    w = torch.randn(40, 24, generator=g).to(dtype).t()  # transposed view
    b = torch.randn(24, generator=g).to(dtype)
    a0 = (torch.randn(6, 40, generator=g) * 0.2).float()  # fp32 adapter on a lower-precision base
    b0 = (torch.randn(24, 6, generator=g) * 0.2).float()
    gy = torch.randn(2, 3, 5, 24, generator=g).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
        x = x0.clone().requires_grad_(True)
        a = a0.clone().requires_grad_(True)
        bb = b0.clone().requires_grad_(True)
        y = lora_linear(x, w, b, a, bb, 0.5, p, seed=1234)
        y.backward(gy)
        results[backend] = (y.detach(), x.grad, a.grad, bb.grad)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"], results["reference"]):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=name)


def test_offsets_beyond_int32_are_refused_before_any_launch():
    """32-bit row offsets would wrap: the launcher refuses, naming the limit (no memory is read)."""
    kern = pytest.importorskip("lora_triton.kernels.lora_linear")
    x = torch.randn(1, 16).expand(2**27 + 1, 16)  # no memory behind it; y would pass 2**31 elements
    a, b = torch.randn(2, 16), torch.randn(16, 2)
    with pytest.raises(ValueError, match=r"32-bit element offsets; \['y / dy \[M, N\]'\].*split the batch"):
        kern.lora_linear_fwd(x, None, None, a, b, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="32-bit element offsets"):
        kern.lora_linear_bwd(x, x, None, a, b, torch.randn(1, 2).expand(2**27 + 1, 2), 1.0, 0.0, None, True)
