"""Grouped LoRA op (G projections of one x) and model-level sibling grouping.

Criterion (per output): max|ours - fp64| <= 2 max|ref - fp64| + atol, ref in ours' precision,
fp64 with the same seeds (hence the same masks).
"""

from __future__ import annotations

import os

import pytest
import torch
from models import tiny_llama

import lora_triton
from lora_triton.nn import LoraLinear, group_siblings, ungroup_siblings
from lora_triton.ops.grouped import lora_linear_grouped
from lora_triton.ops.lora_linear import lora_linear

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _grouping_on(monkeypatch):
    """These tests exercise the grouping itself: on every backend (auto skips it on the CPU reference)."""
    monkeypatch.setenv("LORA_TRITON_GROUP", "on")


def _case(m, k, ns, rs, dtype, seed=0, no_w=(), no_b=()):
    g = torch.Generator().manual_seed(seed + 100 * m + k)
    rnd = lambda *s: torch.randn(*s, generator=g)
    c = dict(x=rnd(m, k), ws=[], bs=[], As=[], Bs=[], dys=[])
    for i, (n, r) in enumerate(zip(ns, rs)):
        c["ws"].append(None if i in no_w else rnd(n, k) / k**0.5)
        c["bs"].append(None if i in no_b else rnd(n))
        c["As"].append(rnd(r, k) / k**0.5)
        c["Bs"].append(rnd(n, r) / r**0.5)
        c["dys"].append(rnd(m, n))
    cast = lambda t: None if t is None else t.to(dtype)
    return {key: ([cast(t) for t in v] if isinstance(v, list) else cast(v)) for key, v in c.items()}


def _grads(fn, c):
    """Forward through ``fn`` (returns the G outputs), backward with c's dys: [y_g..., dx, dA_g..., dB_g...]."""
    x = c["x"].detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in c["As"]]
    Bs = [b.detach().requires_grad_() for b in c["Bs"]]
    ys = fn(x, c["ws"], c["bs"], As, Bs)
    torch.autograd.backward(list(ys), c["dys"])
    return [y.detach() for y in ys] + [x.grad] + [a.grad for a in As] + [b.grad for b in Bs]


def _grouped_fn(sc, ps, seeds):
    return lambda x, ws, bs, As, Bs: lora_linear_grouped(x, ws, bs, As, Bs, sc, ps, seeds)


def _separate_fn(sc, ps, seeds):
    return lambda x, ws, bs, As, Bs: [lora_linear(x, w, b, a, bb, s, p, sd)
                                      for w, b, a, bb, s, p, sd in zip(ws, bs, As, Bs, sc, ps, seeds)]


def _f64(c):
    return {k: ([None if t is None else t.double() for t in v] if isinstance(v, list) else v.double())
            for k, v in c.items()}


def _check(got, refv, truth, dtype):
    for i, (a, b, t) in enumerate(zip(got, refv, truth)):
        assert a.shape == t.shape, (i, a.shape, t.shape)
        a, b, t = a.double(), b.double(), t.double()
        assert torch.isfinite(a).all(), f"output {i}: non-finite"
        err, ref_err = (a - t).abs().max().item(), (b - t).abs().max().item()
        atol = ATOL[dtype] * (1.0 + t.abs().max().item())
        assert err <= 2 * ref_err + atol, f"output {i}: err {err:.3g} vs ref {ref_err:.3g} (atol {atol:.3g})"


# (M, K, N per projection, r per projection): M=1, r=1, GQA-like narrower k/v, differing ranks.
SHAPES = [(1, 100, (33, 17, 17), (1, 3, 2)), (37, 70, (50, 20, 20), (3, 1, 16)), (70, 40, (45, 24), (64, 8))]
SCALINGS = (0.75, 2.0, 1.5)
SEEDS = [987654321, 2**40 + 17, 5]


def _params(shape, p):
    g = len(shape[2])
    ps = [p, 0.0, p][:g] if p > 0 else [0.0] * g  # mixed p: a p=0 projection among dropout ones
    return list(SCALINGS[:g]), ps, SEEDS[:g]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("idx", range(len(SHAPES)))
def test_reference_equals_separate_calls(idx, p, monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    m, k, ns, rs = SHAPES[idx]
    sc, ps, seeds = _params(SHAPES[idx], p)
    c = _case(m, k, ns, rs, torch.float32, no_b=(1,))
    got = _grads(_grouped_fn(sc, ps, seeds), c)
    sep = _grads(_separate_fn(sc, ps, seeds), c)
    truth = _grads(_separate_fn(sc, ps, seeds), _f64(c))
    _check(got, sep, truth, torch.float32)
    for a, b in zip(got, sep):  # same masks: equal up to rounding order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("idx", range(len(SHAPES)))
def test_triton_matches_reference(idx, p, dtype, monkeypatch):
    m, k, ns, rs = SHAPES[idx]
    sc, ps, seeds = _params(SHAPES[idx], p)
    variants = dict(no_w=(2,) if idx == 0 else (), no_b=(0,) if idx == 1 else ())
    c = _case(m, k, ns, rs, dtype, seed=1, **variants)
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    refv = _grads(_grouped_fn(sc, ps, seeds), c)
    truth = _grads(_grouped_fn(sc, ps, seeds), _f64(c))
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    got = _grads(_grouped_fn(sc, ps, seeds), c)
    _check(got, refv, truth, dtype)
    g = len(ns)
    assert all(t.dtype == dtype for t in got[:g + 1])


@pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")
def test_triton_rank_chunks_and_poisoned_outputs(monkeypatch):
    # Total rank 300 > 256 without dropout: two launches, then a dropout launch. NaN-filled outputs
    # check every element is written.
    kern = pytest.importorskip("lora_triton.kernels.grouped")
    monkeypatch.setattr(kern, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))
    assert kern._chunks([200, 100, 50]) == [(0, 1, False), (1, 3, False)]
    assert kern._chunks([16, 16, 16]) == [(0, 3, False)]
    assert kern._chunks([200, 100, 50], [True, True, False]) == [(0, 2, True), (2, 3, False)]
    c = _case(5, 48, (20, 12, 9), (200, 100, 8), torch.float32, seed=2)
    args = ([1.0, 0.5, 2.0], [0.0, 0.0, 0.2], [3, 4, 5])  # launches: [200], [100], [8 with dropout]
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    refv = _grads(_grouped_fn(*args), c)
    truth = _grads(_grouped_fn(*args), _f64(c))
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    _check(_grads(_grouped_fn(*args), c), refv, truth, torch.float32)


def test_each_projection_has_its_own_mask(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    x = torch.randn(8, 32)
    eye = torch.eye(32)
    ys = lora_linear_grouped(x, [None, None], [None, None], [eye, eye], [eye, eye], [1.0, 1.0], [0.5, 0.5], [1, 2])
    assert not torch.equal(ys[0] == 0, ys[1] == 0)  # different seeds, different masks
    ys = lora_linear_grouped(x, [None, None], [None, None], [eye, eye], [eye, eye], [1.0, 1.0], [0.5, 0.5], [7, 7])
    assert torch.equal(ys[0], ys[1])
    torch.manual_seed(0)
    a = lora_linear_grouped(x, [None] * 2, [None] * 2, [eye, eye], [eye, eye], [1.0] * 2, [0.5] * 2)
    torch.manual_seed(0)
    seeds = torch.randint(0, 2**62, (2,))  # seeds=None draws G seeds in one draw
    b = lora_linear_grouped(x, [None] * 2, [None] * 2, [eye, eye], [eye, eye], [1.0] * 2, [0.5] * 2, seeds)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _count_x_saves(fn, x):
    ptr, count = x.untyped_storage().data_ptr(), [0]

    def pack(t):
        count[0] += int(t.untyped_storage().data_ptr() == ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = fn(x)
    sum(y.sum() for y in ys).backward()
    return count[0]


def test_x_saved_once(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    c = _case(16, 32, (24, 8, 8), (4, 4, 4), torch.float32)
    As = [a.requires_grad_() for a in c["As"]]
    args = (c["ws"], c["bs"], As, c["Bs"], [1.0] * 3, [0.1] * 3, [1, 2, 3])
    x = c["x"].requires_grad_()
    assert _count_x_saves(lambda x: lora_linear_grouped(x, *args), x) == 1
    assert _count_x_saves(lambda x: _separate_fn(*args[4:])(x, *args[:4]), x) == 3


def test_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    c = _case(6, 16, (8, 4), (2, 3), torch.float32)
    fn = _grouped_fn([1.0, 2.0], [0.2, 0.0], [5, 6])
    eager = _grads(fn, c)
    torch._dynamo.reset()
    compiled = _grads(torch.compile(fn, fullgraph=True), c)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_weight_and_bias_grads(monkeypatch):
    # Frozen-base is the usual case, but a trainable weight or bias gets its gradient, also when a
    # sibling has no bias (absent operands must not hide the others from autograd).
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    c = _case(6, 16, (8, 4), (2, 3), torch.float32, no_b=(1,))
    leaves = lambda: ([w.clone().requires_grad_() for w in c["ws"]], [c["bs"][0].clone().requires_grad_(), None])
    grads = []
    for fn in (_grouped_fn, _separate_fn):
        ws, bs = leaves()
        ys = fn([1.0, 2.0], [0.0, 0.0], [None, None])(c["x"], ws, bs, c["As"], c["Bs"])
        torch.autograd.backward(list(ys), c["dys"])
        grads.append([ws[0].grad, ws[1].grad, bs[0].grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_in_features(p, monkeypatch):
    # K = 0 is a valid input, as for lora_linear: y = b (no base or LoRA term), zero gradients.
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    x = torch.randn(2, 3, 0, requires_grad=True)
    a_s = [torch.randn(2, 0, requires_grad=True) for _ in range(2)]
    b_s = [torch.randn(4, 2, requires_grad=True) for _ in range(2)]
    ys = lora_linear_grouped(x, [torch.randn(4, 0)] * 2, [None, torch.ones(4)], a_s, b_s, [1.0, 2.0], [p, p])
    assert [tuple(y.shape) for y in ys] == [(2, 3, 4)] * 2
    torch.testing.assert_close(ys[0], torch.zeros(2, 3, 4))
    torch.testing.assert_close(ys[1], torch.ones(2, 3, 4))
    sum(y.sum() for y in ys).backward()
    assert x.grad.shape == x.shape and not b_s[0].grad.any()


def test_validation_errors():
    x = torch.randn(4, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="projection 1: lora_A"):
        lora_linear_grouped(x, [None, None], [None, None], [a, torch.randn(2, 9)], [b, b], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="one entry per projection"):
        lora_linear_grouped(x, [None], [None, None], [a, a], [b, b], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="seeds"):
        lora_linear_grouped(x, [None, None], [None, None], [a, a], [b, b], [1, 1], [0.1, 0.1], seeds=[1])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_grouped(x, [None, None], [None, None], [a, a], [b, b], [1, 1], [0.1, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        lora_linear_grouped(x, [], [], [], [], [], [])


# ----------------------------------------------------------------------------- model level

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


def _lora_llama(p=0.0):
    from lora_triton import LoraConfig
    from lora_triton.nn import inject_lora
    from tests.models import tiny_llama

    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=TARGETS))
    assert ungroup_siblings(model) == 10  # inject_lora groups q/k/v and gate/up; start plain
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so every LoRA gradient is non-trivial
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_llama_grouped_equals_ungrouped(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    model = _lora_llama().train()  # p = 0: training mode changes nothing but exercises the path
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    want_out, want = _loss_and_grads(model, ids)
    groups = group_siblings(model)
    assert sorted(tuple(g.names) for g in groups) == [("gate_proj", "up_proj")] * 2 + [
        ("q_proj", "k_proj", "v_proj")] * 2
    got_out, got = _loss_and_grads(model, ids)
    assert sum(g.grouped_calls for g in groups) == 4 and sum(g.cache_hits for g in groups) == 6
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(TARGETS)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(not g._outputs for g in groups)  # every cached output was consumed
    assert ungroup_siblings(model) == 10 and "forward" not in model.model.layers[0].self_attn.q_proj.__dict__
    again_out, _ = _loss_and_grads(model, ids)
    torch.testing.assert_close(again_out, want_out)


def test_group_stands_down_when_siblings_read_different_inputs(monkeypatch):
    """Cross-attention: q reads one tensor, k and v another. Grouped calls whose outputs nobody
    takes are waste; after MAX_WASTED of them the members run their plain forwards."""
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    attn = _Attn(0.0)
    (group,) = group_siblings(attn)
    plain = lambda m, x: LoraLinear.forward(m, x)
    for _ in range(4):
        dec, enc = torch.randn(3, 16), torch.randn(5, 16)
        q, k, v = attn.q_proj(dec), attn.k_proj(enc), attn.v_proj(enc)
        torch.testing.assert_close(q, plain(attn.q_proj, dec))
        torch.testing.assert_close(k, plain(attn.k_proj, enc))
        torch.testing.assert_close(v, plain(attn.v_proj, enc))
    assert not group.enabled and group.wasted == group.MAX_WASTED
    calls = group.grouped_calls
    attn.q_proj(dec), attn.k_proj(dec)
    assert group.grouped_calls == calls  # stood down for good


def test_inject_lora_groups_siblings_and_merge_and_unload_ungroups():
    model = tiny_llama(seed=0)
    lora_triton.inject_lora(model, lora_triton.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = model.model.layers[0].self_attn
    assert hasattr(attn.q_proj, "_lora_sibling_group")
    lora_triton.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


class _Attn(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = LoraLinear(torch.nn.Linear(16, 16), r=2, lora_dropout=p, init_lora_weights="gaussian")
        self.k_proj = LoraLinear(torch.nn.Linear(16, 8), r=3, lora_dropout=p, init_lora_weights="gaussian")
        self.v_proj = LoraLinear(torch.nn.Linear(16, 8, bias=False), r=3, lora_dropout=p)
        for m in (self.q_proj, self.k_proj, self.v_proj):
            torch.nn.init.normal_(next(iter(m.lora_B.values())).weight)


def test_dropout_group_equals_separate_calls_with_its_seeds(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    attn = _Attn(0.25).train()
    (group,) = group_siblings(attn)
    x = torch.randn(5, 16)
    torch.manual_seed(3)
    got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert group.grouped_calls == 1 and group.cache_hits == 2
    torch.manual_seed(3)
    seeds = torch.randint(0, 2**62, (3,))
    for i, m in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        want = lora_linear(x, m.base_weight(), m.base_bias(), m.lora_A["default"].weight,
                           m.lora_B["default"].weight, m.scaling["default"], 0.25, seeds[i:i + 1])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_grouping_only_shares_provably_equal_inputs(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    attn = _Attn(0.0)
    (group,) = group_siblings(attn)
    group.MAX_WASTED = 10**9  # this test wastes cached outputs on purpose: keep the group on
    plain = lambda m, x: LoraLinear.forward(m, x)
    x = torch.randn(4, 16)
    q = attn.q_proj(x)
    k = attn.k_proj(x.clone())  # an equal but different tensor: recomputed, not taken from the cache
    assert group.grouped_calls == 2 and group.cache_hits == 0
    x.mul_(2.0)  # in place: the version counter moves, the cached output is stale
    v = attn.v_proj(x)
    assert group.grouped_calls == 3
    torch.testing.assert_close(q, plain(attn.q_proj, x / 2))
    torch.testing.assert_close(k, plain(attn.k_proj, x / 2))
    torch.testing.assert_close(v, plain(attn.v_proj, x))
    attn.k_proj.disable_adapters = True  # k leaves the group; q's cached output (same x, same q) stays valid
    q, k = attn.q_proj(x), attn.k_proj(x)
    torch.testing.assert_close(q, plain(attn.q_proj, x))
    torch.testing.assert_close(k, attn.k_proj.base_layer(x))
    assert group.grouped_calls == 3 and group.cache_hits == 1
    v = attn.v_proj(x)  # the cache is spent: a fresh group call of q and v only
    torch.testing.assert_close(v, plain(attn.v_proj, x))
    assert group.grouped_calls == 4
    with torch.no_grad():
        attn.q_proj.lora_B["default"].weight.add_(1.0)  # q's own state moved: its cached output is stale
    q = attn.q_proj(x)
    torch.testing.assert_close(q, plain(attn.q_proj, x))
    assert group.grouped_calls == 5
    attn.k_proj.disable_adapters = False
    attn.k_proj.mixed_batch = lambda layer, x: torch.zeros(1)  # a mixed batch hook wins
    assert attn.k_proj(x).shape == (1,)
    attn.k_proj.mixed_batch = None
    assert attn.q_proj(x[:2]).shape == (2, 16)  # another view: a fresh group call
    calls = group.grouped_calls
    with torch.inference_mode():  # no version counter to prove x unchanged: plain forwards
        y = torch.randn(3, 16)
        torch.testing.assert_close(attn.q_proj(y), plain(attn.q_proj, y))
    assert group.grouped_calls == calls


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_auto_policy_runs_plain_forwards_on_the_cpu_reference_with_the_same_bits(p, monkeypatch):
    """LORA_TRITON_GROUP=auto (the default): no grouped call on the CPU reference (it does not pay there), and
    the outputs and gradients are those of the ungrouped model, bit for bit (same seeds, same masks)."""
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    model = _lora_llama(p).train()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    want_out, want = _loss_and_grads(model, ids)
    groups = group_siblings(model)
    monkeypatch.setenv("LORA_TRITON_GROUP", "auto")
    torch.manual_seed(4)
    got_out, got = _loss_and_grads(model, ids)
    assert sum(g.grouped_calls for g in groups) == 0
    assert torch.equal(got_out, want_out) and all(torch.equal(got[n], want[n]) for n in want)
    monkeypatch.setenv("LORA_TRITON_GROUP", "on")
    torch.manual_seed(4)
    on_out, on = _loss_and_grads(model, ids)
    assert sum(g.grouped_calls for g in groups) == 4
    if p > 0:  # the group draws its members' seeds in one draw: the same values, so the same masks
        torch.testing.assert_close(on_out, want_out, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LORA_TRITON_GROUP", "sometimes")
    with pytest.raises(ValueError, match="LORA_TRITON_GROUP must be one of"):
        model(ids)


def test_grouping_pays_by_policy_and_backend(monkeypatch):
    from lora_triton.nn.grouping import grouping_pays

    cpu = torch.device("cpu")
    monkeypatch.delenv("LORA_TRITON_GROUP", raising=False)  # auto
    for backend, pays in (("reference", False), ("auto", False), ("triton", True)):
        monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
        assert grouping_pays(cpu) is pays, backend
    monkeypatch.setenv("LORA_TRITON_GROUP", "off")
    assert not grouping_pays(cpu)
    monkeypatch.setenv("LORA_TRITON_GROUP", " ON ")
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    assert grouping_pays(cpu)
