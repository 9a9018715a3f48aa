"""The DoRA op (ops/dora.py on the reference path): factored norm, forward and every gradient vs an fp64
dense formula of PEFT's form, stability where m / n is close to 1, bad inputs, the saved-for-backward bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import model_input, tiny_mlp
from twice_rule import f64

import lora_triton
from lora_triton.ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
from lora_triton.reference.philox import dropout_keep_mask

SHAPES = [(1, 5, 3, 1), (7, 33, 17, 4), (16, 40, 24, 8), (3, 9, 64, 2)]  # M, K, N, r: M=1, r=1, off-grid sizes


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def _operands(m, k, n, r, dtype, seed=0, near_one=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * k ** -0.5
    a = torch.randn(r, k, generator=g, dtype=torch.float64) * k ** -0.5
    # s B A smaller than W, as in training: the factored norm loses relative accuracy ~ eps ||W_i||^2 / n_i^2
    # only where the adapter cancels most of a row (docs/dora.md).
    b = torch.randn(n, r, generator=g, dtype=torch.float64) * 0.1
    s = 1.7
    norm = (w + s * b @ a).norm(dim=1)
    # Trained magnitudes sit close to the norm (m / n = 1 +- 1e-3): where PEFT's (m / n - 1) cancels.
    spread = 1e-3 if near_one else 0.4
    mag = norm * (1 + spread * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1))
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    bias_t = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    cast = {"x": x, "w": w, "a": a, "b": b, "mag": mag, "bias": bias_t, "dy": dy}
    return s, {k_: (None if v is None else v.to(dtype)) for k_, v in cast.items()}


def _peft_form(t, s, keep=None, p=0.0):
    """PEFT's DoRA formula, written out in the tensors' own precision (fp64 operands give the truth)."""
    x, w, a, b, mag, bias = t["x"], t["w"], t["a"], t["b"], t["mag"], t["bias"]
    norm = (w + s * b @ a).norm(dim=1).detach()
    scale = mag / norm
    base = x @ w.t() + (0 if bias is None else bias)
    if keep is None:
        return base + (scale - 1) * (base - (0 if bias is None else bias)) + scale * (s * ((x @ a.t()) @ b.t()))
    xd = x * keep / (1 - p)
    return base + (scale - 1) * (xd @ w.t()) + scale * (s * ((xd @ a.t()) @ b.t()))


def _grads(fn, t, names):
    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in names}
    full = {**t, **leaves}
    y = fn(full)
    return [y.detach(), *torch.autograd.grad(y, [leaves[k] for k in names], t["dy"])]


NAMES = ["x", "a", "b", "mag", "bias"]


def _ours(s, p=0.0, seed=None):
    return lambda t: dora_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], t["mag"], s, p, seed)


def _three_ways(s, t, p, seed, names=NAMES):
    """Output and gradients of dora_linear, of PEFT's form in the same precision, and of PEFT's form in
    fp64 (the truth), all with the kernels' dropout mask."""
    m, k = t["x"].shape
    keep = dropout_keep_mask(seed, m, k, p) if p else None
    ours = _grads(_ours(s, p, seed), t, names)
    same = _grads(lambda tt: _peft_form(tt, s, keep, p), t, names)
    truth = _grads(lambda tt: _peft_form(tt, s, keep, p), {k_: f64(v) for k_, v in t.items()}, names)
    return ours, same, truth


def _check_close(ours, same, truth, atol):
    for i, (o, q, e) in enumerate(zip(ours, same, truth)):
        err = (o.double() - e).abs().max().item()
        ref_err = (q.double() - e).abs().max().item()
        assert err <= 2 * ref_err + atol * (1.0 + e.abs().max().item()), (NAMES[i - 1] if i else "y", err, ref_err)


@pytest.mark.parametrize("m, k, n, r", SHAPES)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_weight_norm_factored_matches_dense(m, k, n, r, dtype, atol):
    s, t = _operands(m, k, n, r, dtype)
    truth = (t["w"].double() + s * t["b"].double() @ t["a"].double()).norm(dim=1)
    ours = dora_weight_norm(t["w"], t["a"], t["b"], s)
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    same = (t["w"] + s * t["b"] @ t["a"]).float().norm(dim=1)  # PEFT: dense, in the weights' precision
    err, ref_err = (ours.double() - truth).abs().max().item(), (same.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + atol * 1e-2, (err, ref_err)
    assert torch.equal(dora_weight_sq(t["w"]), dora_weight_sq(t["w"]))  # deterministic


@pytest.mark.parametrize("m, k, n, r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_gradients_fp32_vs_fp64(m, k, n, r, p):
    s, t = _operands(m, k, n, r, torch.float32)
    seed = 1234
    ours, same, truth = _three_ways(s, t, p, seed)
    _check_close(ours, same, truth, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_half_precision_where_scale_is_near_one(dtype, atol, p):
    """m / n = 1 +- 1e-3: ours (g - 1 from fp32 m and n) is at least as close to fp64 as PEFT's form in
    the same precision, outputs and every gradient."""
    m, k, n, r = 9, 48, 40, 4
    s, t = _operands(m, k, n, r, dtype, seed=5, near_one=True)
    seed = 77
    ours, same, truth = _three_ways(s, t, p, seed)
    scale = truth[0].abs().max().item()
    _check_close(ours, same, truth, atol=atol * scale)
    assert all(torch.isfinite(o).all() for o in ours)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(6, 21), n=st.integers(1, 19), r=st.integers(1, 5),
       p=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**31), bias=st.booleans())
def test_random_shapes_match_fp64(m, k, n, r, p, seed, bias):
    s, t = _operands(m, k, n, r, torch.float32, seed=seed % 1000, bias=bias)
    ours, same, truth = _three_ways(s, t, p, seed, NAMES if bias else NAMES[:-1])
    _check_close(ours, same, truth, atol=1e-5)


def test_norm_is_detached_and_weight_grad():
    """n is a constant (DoRA §4.3): a trainable W gets dL/dW = (g dy)^T x, not the norm's derivative."""
    s, t = _operands(5, 12, 10, 3, torch.float64, bias=False)
    keep = None
    ours = _grads(_ours(s), t, ["w"])
    same = _grads(lambda tt: _peft_form(tt, s, keep), t, ["w"])
    # The norm is float32 by contract, so even fp64 operands agree to fp32 precision only.
    assert (ours[1] - same[1]).abs().max().item() < 1e-5 * same[1].abs().max().item()


def test_saved_for_backward_is_one_tokens_by_out_tensor():
    m, k, n, r = 64, 48, 40, 4
    s, t = _operands(m, k, n, r, torch.float32, bias=False)
    params = {k_: t[k_].requires_grad_(True) for k_ in ("x", "a", "b", "mag")}
    known = {v.untyped_storage().data_ptr() for v in (*params.values(), t["w"])}
    for p in (0.0, 0.5):
        sizes: dict[int, int] = {}

        def pack(x, sizes=sizes):
            if x.untyped_storage().data_ptr() not in known:
                sizes[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            y = _ours(s, p, 3)(t)
        y.sum().backward()
        # y_pre [M, N] + U [M, r] + norm [N] + seed: nothing [M, K] or [N, K].
        assert m * n * 4 <= sum(sizes.values()) <= (m * n + m * r + n) * 4 + 64, (p, sizes)


@pytest.mark.parametrize("bad, match", [
    (dict(w=None), "needs the base weight"),
    (dict(mag=torch.ones(3)), r"magnitude must be a floating-point \[out_features=10\]"),
    (dict(mag=torch.ones(10, dtype=torch.int64)), "magnitude must be a floating-point"),
    (dict(a=torch.ones(3, 11)), r"lora_A must be \[r, in_features=12\]"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    s, t = _operands(5, 12, 10, 3, torch.float32)
    t.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        _ours(s)(t)


def test_bad_weight_norm_raises():
    s, t = _operands(5, 12, 10, 3, torch.float32)
    with pytest.raises(ValueError, match=r"weight_norm must be float32 \[out_features=10\]"):
        dora_linear(t["x"], t["w"], None, t["a"], t["b"], t["mag"], s, weight_norm=torch.ones(10, dtype=torch.float64))


def test_custom_ops_pass_opcheck():
    s, t = _operands(6, 12, 10, 3, torch.float32)
    from lora_triton.ops import dora as ops

    norm = dora_weight_norm(t["w"], t["a"], t["b"], s)
    args = (t["x"], t["w"], t["bias"], t["a"].requires_grad_(True), t["b"].requires_grad_(True),
            t["mag"].requires_grad_(True), norm, s, 0.0, None)
    torch.library.opcheck(ops._fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(ops._weight_norm, (t["w"], t["a"].detach(), t["b"].detach(), s, dora_weight_sq(t["w"])))


def test_dora_model_compiles_fullgraph_with_the_same_gradients():
    """torch.compile(fullgraph=True) traces DoRA layers (norm and op are custom ops; no cache while tracing)."""
    torch._dynamo.reset()
    cfg = lora_triton.LoraConfig(target_modules=["up", "down"], r=3, lora_alpha=6, lora_dropout=0.2, use_dora=True,
                                 init_lora_weights=False)
    model = lora_triton.inject_lora(tiny_mlp(), cfg).train()
    x = model_input("mlp")["x"]
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.dim() == 1 for p in params)  # the magnitudes train

    def step(fn):
        torch.manual_seed(7)
        loss = (fn(x) ** 2).mean()
        return loss.detach(), torch.autograd.grad(loss, params)

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
