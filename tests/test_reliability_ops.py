"""Issue 8, ops: one behaviour on both backends (Triton through the interpreter, and the reference):
the same clear errors for bad scalars, the same results for the edge shapes, and unchecked serving
values (validate=False) that never index out of bounds."""

from __future__ import annotations

import os

import pytest
import torch

import lora_triton
from lora_triton.ops.multi_lora import multi_lora_linear

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)
pytest.importorskip("triton", reason="the Triton backend is half of every comparison")

BACKENDS = ("reference", "triton")


def _on(backend, monkeypatch, fn):
    monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
    try:
        return fn()
    finally:
        monkeypatch.delenv("LORA_TRITON_BACKEND")


def _operands(m=3, k=8, n=5, r=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return rnd(m, k), rnd(n, k), rnd(n), rnd(r, k), rnd(n, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    (dict(scaling="2"), TypeError, "scaling must be a float, got str"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float, got str '0.1'"),
    (dict(dropout_p=True), TypeError, "dropout_p must be a float, got bool"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int.*got float 1.5"),
    (dict(dropout_p=0.1, seed=True), TypeError, "seed must be an int"),
])
def test_lora_linear_bad_scalars_same_error(monkeypatch, backend, kwargs, exc, match):
    x, w, b, a, bb = _operands()
    args = dict(scaling=0.5, dropout_p=0.0, seed=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        _on(backend, monkeypatch, lambda: lora_triton.lora_linear(x, w, b, a, bb, args["scaling"],
                                                                  args["dropout_p"], seed=args["seed"]))


def _forward_backward(x, w, b, a, bb, p=0.0):
    x, a, bb = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    y = lora_triton.lora_linear(x, w, b, a, bb, 0.75, p, seed=7)
    y.sum().backward()
    return y.detach(), x.grad, a.grad, bb.grad


@pytest.mark.parametrize("m, k, n, r, dtype", [
    (3, 8, 5, 0, torch.float32),     # rank 0: the LoRA term is zero
    (2, 8, 5, 300, torch.float32),   # rank above the kernels' 256
    (3, 8, 5, 2, torch.float64),     # a dtype the kernels do not take
    (3, 0, 5, 2, torch.float32),     # K = 0: y = bias
])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_lora_linear_edge_shapes_same_result(monkeypatch, m, k, n, r, dtype, p):
    ops = _operands(m, k, n, r, dtype)
    ref = _on("reference", monkeypatch, lambda: _forward_backward(*ops, p=p))
    tri = _on("triton", monkeypatch, lambda: _forward_backward(*ops, p=p))
    for got, want in zip(tri, ref):
        assert torch.equal(got, want)
    assert ref[0].shape == (m, n) and torch.isfinite(ref[0]).all()


def _stack(num=3, r_max=4, k=8, n=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g),
            torch.randn(num, r_max, k, generator=g), torch.randn(num, n, r_max, generator=g),
            torch.rand(num, generator=g) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, match", [
    (dict(ranks=torch.tensor([2, 2**32 + 4, 1])), r"ranks must be in \[0, r_max=4\]"),
    (dict(ranks=torch.tensor([2, -1, 1])), r"ranks must be in \[0, r_max=4\]"),
    (dict(ids=torch.tensor([0, 3, 1, -1, 2])), r"adapter_ids must be in \[-1, 2\]"),
    (dict(ids=torch.tensor([0, -2, 1, -1, 2])), r"adapter_ids must be in \[-1, 2\]"),
    (dict(scalings=torch.tensor([1.0, float("nan"), 1.0])), "scalings must be finite"),
    (dict(scalings=torch.tensor([1.0, 1.0, float("-inf")])), "scalings must be finite"),
])
def test_multi_lora_bad_values_same_error(monkeypatch, backend, change, match):
    x, w, b, a, bb, s = _stack()
    ids = change.get("ids", torch.tensor([0, 2, 1, -1, 2]))
    with pytest.raises(ValueError, match=match):
        _on(backend, monkeypatch, lambda: multi_lora_linear(x, w, b, a, bb, change.get("scalings", s), ids,
                                                            change.get("ranks", torch.tensor([2, 4, 1]))))


@pytest.mark.parametrize("t", [5, 20])  # the fused decode kernel, and shrink + expand
def test_unvalidated_values_mean_the_same_on_both_backends(monkeypatch, t):
    x, w, b, a, bb, s = _stack(t=t)
    x, w, b = x[:5].repeat(t // 5, 1), w, b
    bad_ids = torch.tensor([0, 3, 1, -7, 2] * (t // 5))  # 3 == L and -7: no adapter
    bad_ranks = torch.tensor([2, 2**32 + 4, -3])  # int64: clamped to [0, r_max] before the int32 cast
    ref = _on("reference", monkeypatch, lambda: multi_lora_linear(x, w, b, a, bb, s, bad_ids, bad_ranks,
                                                                  validate=False))
    tri = _on("triton", monkeypatch, lambda: multi_lora_linear(x, w, b, a, bb, s, bad_ids, bad_ranks,
                                                               validate=False))
    want = multi_lora_linear(x, w, b, a, bb, s, torch.tensor([0, -1, 1, -1, -1] * (t // 5)), torch.tensor([2, 4, 0]))
    torch.testing.assert_close(ref, want, rtol=0, atol=0)
    torch.testing.assert_close(tri, want, rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x, w, b)
    rows = [i for i in range(t) if i % 5 in (1, 3, 4)]
    assert torch.equal(ref[rows], base[rows]) and torch.equal(tri[rows], base[rows])


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_kernels_clamp_ranks_themselves(mode):
    from lora_triton.kernels import multi_lora as kern
    from lora_triton.reference import multi_lora as ref

    x, w, b, a, bb, s = _stack(r_max=3)
    ids = torch.tensor([[0], [1], [2], [1], [0]])
    # Padding of the stacks is NaN: a rank read past r_max would poison the output.
    a_pad = torch.full((3, 40, 8), float("nan"))
    a_pad[:, :3] = a
    bad = torch.tensor([1000, -5, 2], dtype=torch.int32)
    got = kern.multi_lora_linear(x, w, b, a_pad[:, :3], bb, s, ids, bad, mode=mode)
    want = ref.multi_lora_linear(x, w, b, a, bb, s, ids, torch.tensor([3, 0, 2], dtype=torch.int32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
