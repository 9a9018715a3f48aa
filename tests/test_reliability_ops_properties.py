"""Issue 8, property-based: random shapes, dtypes, ranks, scalings, dropout, ids, ranks and weights
give the same outcome on both backends (Triton through the interpreter, the reference): the same
error class, or results within the team's criterion against fp64 (|kernel - fp64| <= 2 |reference -
fp64| + atol). Tiny shapes, few examples: the interpreter is slow."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lora_triton
from lora_triton.ops.multi_lora import multi_lora_linear

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)
pytest.importorskip("triton", reason="the Triton backend is half of every comparison")

SETTINGS = dict(deadline=None, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-12}


def _outcome(backend: str, fn):
    old = os.environ.get("LORA_TRITON_BACKEND")
    os.environ["LORA_TRITON_BACKEND"] = backend
    try:
        return "ok", fn()
    except Exception as exc:  # the class is what must agree
        return type(exc), str(exc)
    finally:
        if old is None:
            os.environ.pop("LORA_TRITON_BACKEND")
        else:
            os.environ["LORA_TRITON_BACKEND"] = old


def _close(name, got, ref, truth, dtype):
    assert got.shape == ref.shape == truth.shape, name
    if not got.numel():
        return
    got, ref, truth = got.double(), ref.double(), truth.double()
    assert torch.equal(got.isfinite(), ref.isfinite()), f"{name}: non-finite in other places"
    keep = ref.isfinite() & truth.isfinite()  # garbage in (validate=False, NaN scaling): NaN in the same places
    if not keep.any():
        return
    got, ref, truth = got[keep], ref[keep], truth[keep]
    err, ref_err = (got - truth).abs().max().item(), (ref - truth).abs().max().item()
    atol = ATOL[dtype] * (1.0 + truth.abs().max().item())
    assert err <= 2 * ref_err + atol, f"{name}: kernel err {err:.3g} vs reference err {ref_err:.3g}"


def _both(fn, truth_fn, dtype):
    ref, tri = _outcome("reference", fn), _outcome("triton", fn)
    assert ref[0] == tri[0], f"reference: {ref}, triton: {tri}"
    if ref[0] == "ok":
        truth = _outcome("reference", truth_fn)[1]
        for i, (g, r, t) in enumerate(zip(tri[1], ref[1], truth)):
            _close(f"output {i}", g, r, t, dtype)


@settings(max_examples=25, **SETTINGS)
@given(m=st.integers(0, 5), k=st.integers(0, 12), n=st.integers(1, 9), r=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
       scaling=st.sampled_from([0.5, 2, -1.0, float("nan"), float("inf"), "1"]),
       p=st.sampled_from([0.0, 0.25, "0.1", float("nan"), 1.0]),
       seed=st.sampled_from([None, 3, 1.5, -1]), with_weight=st.booleans(), with_bias=st.booleans(),
       data_seed=st.integers(0, 2**16))
def test_lora_linear_same_outcome_on_both_backends(m, k, n, r, dtype, scaling, p, seed, with_weight, with_bias,
                                                   data_seed):
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / max(k, 1) ** 0.5 if with_weight else None
    b = torch.randn(n, generator=g) if with_bias else None
    a, bb = torch.randn(r, k, generator=g) / max(k, 1) ** 0.5, torch.randn(n, r, generator=g)
    dy = torch.randn(m, n, generator=g)
    seed = 5 if seed is None and p not in (0.0,) else seed  # the same mask on both backends

    def run(dt):
        cast = lambda t: None if t is None else t.to(dt)
        xs, as_, bs = (cast(t).detach().clone().requires_grad_(True) for t in (x, a, bb))
        y = lora_triton.lora_linear(xs, cast(w), cast(b), as_, bs, scaling, p, seed=seed)
        y.backward(cast(dy))
        return y.detach(), xs.grad, as_.grad, bs.grad

    _both(lambda: run(dtype), lambda: run(torch.float64), dtype)


@settings(max_examples=20, **SETTINGS)
@given(t=st.integers(1, 20), num=st.integers(1, 3), r_max=st.integers(1, 5), slots=st.integers(1, 2),
       dtype=st.sampled_from([torch.float32, torch.float16]), validate=st.booleans(),
       id_range=st.sampled_from([(-1, 0), (-1, 1), (-2, 1), (-1, 2)]),
       rank_range=st.sampled_from([(0, 0), (0, 1), (-1, 1), (0, 2), (0, 2**32)]),
       scal=st.sampled_from([1.0, float("nan")]), weighted=st.booleans(), data_seed=st.integers(0, 2**16))
def test_multi_lora_same_outcome_on_both_backends(t, num, r_max, slots, dtype, validate, id_range, rank_range, scal,
                                                  weighted, data_seed):
    # id_range / rank_range are offsets from the valid ranges [-1, L) and [0, r_max].
    g = torch.Generator().manual_seed(data_seed)
    k, n = 7, 5
    x, w, b = torch.randn(t, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    a, bb = torch.randn(num, r_max, k, generator=g), torch.randn(num, n, r_max, generator=g)
    scalings = torch.rand(num, generator=g) + 0.5
    scalings[0] *= scal
    ids = torch.randint(id_range[0], num + id_range[1], (t, slots), generator=g)
    ranks = torch.randint(rank_range[0], r_max + 1 + rank_range[1], (num,), generator=g, dtype=torch.int64)
    aw = torch.rand(t, slots, generator=g) if weighted else None

    def run(dt):
        cast = lambda v: None if v is None else v.to(dt)
        with torch.no_grad():
            return (multi_lora_linear(cast(x), cast(w), cast(b), cast(a), cast(bb), scalings, ids, ranks, aw,
                                      validate=validate),)

    _both(lambda: run(dtype), lambda: run(torch.float64), dtype)
