"""LoKr (peft_type LOKR): PEFT's format both ways on Linear / Conv1d / Conv2d (outputs and gradients after
training), the reshape form W1 X W2^T against kron() in fp64 (outputs, gradients, saved tensors),
PEFT's factorization, Conv1d with use_effective_conv2d (PEFT crashes), dropout masks, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from kinds_models import call, conv_inputs, conv_net, max_diff, peft_both_ways, trained_conv_net

import lora_triton as lt
from lora_triton.nn.lokr import LoKrLayer, factorization
from lora_triton.ops.lokr import chain_order, lokr_conv, lokr_linear

peft = pytest.importorskip("peft", reason="PEFT is the oracle for the LoKr format")


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["c1", "c2", "proj", "head"], r=1, alpha=3),
    dict(target_modules=["c2", "proj"], r=2, alpha=2, decompose_both=True, decompose_factor=2,
         rank_pattern={"proj": 4}),
    dict(target_modules=["c2", "proj"], r=1, init_weights="lycoris", use_effective_conv2d=True),
    dict(target_modules=["c1", "proj"], r=8, alpha=4),  # full w1 and w2: PEFT still scales by alpha / r
], ids=["low-rank-w2", "decompose-both-factor", "lycoris-effective", "full-factors"])
def test_lokr_peft_both_ways(kwargs, tmp_path):
    init = kwargs.pop("init_weights", False)
    cfg = peft.LoKrConfig(init_weights=init, **kwargs)

    def build():
        net = conv_net(groups=1)
        if init == "lycoris":  # lycoris init leaves dW = 0: start PEFT's training from a non-zero adapter
            torch.manual_seed(5)
        return net

    diffs = peft_both_ways(build, conv_inputs(), cfg, tmp_path)
    assert diffs["peft->ours"] <= 1e-5


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(64) == (8, 8) and factorization(1024) == (32, 32) and factorization(32) == (4, 8)
    for dim in (1, 2, 7, 12, 30, 96, 100, 4096, 4097):
        for f in (-1, 2, 3, 5, 16):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


@pytest.mark.parametrize("a,b,c,d,m", [(1, 1, 1, 1, 1), (3, 5, 2, 7, 4), (4, 2, 6, 3, 1)])
def test_reshape_form_equals_kron_fp64_with_gradients(a, b, c, d, m):
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(a, c, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(m, 2, c * d, generator=g, dtype=torch.float64, requires_grad=True)
    row = torch.rand(a * b, generator=g, dtype=torch.float64)
    y = lokr_linear(x, w1, w2, 0.3, row)
    want = (x @ torch.kron(w1, w2).t() * 0.3) * row
    assert max_diff(y, want) <= 1e-12
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, w1, w2], dy)
    ref = torch.autograd.grad(want, [x, w1, w2], dy)
    for u, v in zip(got, ref):
        assert max_diff(u, v) <= 1e-12


@pytest.mark.parametrize("a,b,c,d,r,m", [(3, 5, 2, 7, 2, 4), (1, 1, 1, 1, 1, 1), (8, 4, 2, 16, 3, 5)])
@pytest.mark.parametrize("low1,low2", [(False, False), (False, True), (True, True)])
def test_fused_chain_with_base_equals_dense_fp64(a, b, c, d, r, m, low1, low2):
    # The hand-written backward: low-rank pairs kept split, the base GEMM in the same Function, every gradient.
    g = torch.Generator().manual_seed(a + 10 * m + low1 + 2 * low2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    w1 = (rnd(a, r), rnd(r, c)) if low1 else rnd(a, c)
    w2 = (rnd(b, r), rnd(r, d)) if low2 else rnd(b, d)
    weight, bias, x = rnd(a * b, c * d), rnd(a * b), rnd(m, 2, c * d)
    leaves = [x, weight, bias, *(w1 if low1 else [w1]), *(w2 if low2 else [w2])]
    full1, full2 = (w1[0] @ w1[1] if low1 else w1), (w2[0] @ w2[1] if low2 else w2)
    want = x @ (weight + 0.3 * torch.kron(full1, full2)).t() + bias
    y = lokr_linear(x, w1, w2, 0.3, weight=weight, bias=bias)
    assert max_diff(y, want) <= 1e-12
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for u, v in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        assert max_diff(u, v) <= 1e-12


def test_chain_order_takes_the_cheapest_interleaving():
    # x [c=32, d=32], W2 = [32, 8] x [8, 32]: x w2_b^T first (to 8 columns), then W1, then w2_a.
    assert chain_order([(32, 32)], [(8, 32), (32, 8)], 32, 32) == [1]
    # A wide W1 [256, 4] on 4 rows: apply it last, after the columns shrink to 2.
    assert chain_order([(256, 4)], [(2, 64)], 4, 64) == [1]
    assert chain_order([(2, 64)], [(256, 4)], 64, 4) == [0]


def test_lokr_linear_training_gradients_match_peft():
    # A 64 x 96 Linear (W1 full, W2 low-rank; decompose_both: both low-rank), x requiring grad as in training.
    for kwargs in (dict(r=2), dict(r=1, decompose_both=True, decompose_factor=4)):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(96, 64))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(target_modules=["0"], init_weights=False,
                                                                          **kwargs))
        ours = lt.inject_lora(copy.deepcopy(base), lt.LoKrConfig(target_modules=["0"], **kwargs))
        named = dict(theirs.named_parameters())
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if p.requires_grad:
                    p.copy_(named["base_model.model." + n])
        x = torch.randn(7, 96, requires_grad=True)
        got, want = ours(x), theirs(x)
        assert max_diff(got, want) <= 1e-5
        ours_p = [p for p in ours.parameters() if p.requires_grad]
        theirs_p = [named["base_model.model." + n] for n, p in ours.named_parameters() if p.requires_grad]
        dy = torch.randn(got.shape)
        for u, v in zip(torch.autograd.grad(got, [x, *ours_p], dy), torch.autograd.grad(want, [x, *theirs_p], dy)):
            assert max_diff(u, v) <= 1e-5 * (1 + v.abs().max().item())


def test_reshape_form_saves_only_x_and_the_factors():
    w1 = torch.randn(32, 32, requires_grad=True)
    w2 = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(64, 1024, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lokr_linear(x, w1, w2, 1.0)
    # x (shared with the base layer's own backward) and the two 32x32 factors; never the 1024x1024 kron.
    assert sum(saved) <= x.numel() + 4 * 32 * 32, saved


@pytest.mark.parametrize("conv,kernel,stride,dilation", [(torch.nn.Conv2d, 3, 2, 1), (torch.nn.Conv2d, 3, 1, 2),
                                                         (torch.nn.Conv1d, 3, 1, 1)])
def test_conv_reshape_form_equals_kron_fp64(conv, kernel, stride, dilation):
    base = conv(6, 8, kernel, stride=stride, padding=dilation, dilation=dilation).double()
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 2, *base.kernel_size, generator=g, dtype=torch.float64)
    x = torch.randn(2, 6, *([9] * (base.weight.dim() - 2)), generator=g, dtype=torch.float64)
    w1k = w1.reshape(2, 3, *([1] * (w2.dim() - 2)))
    want = base._conv_forward(x, torch.kron(w1k, w2) * 0.5, None)
    assert max_diff(lokr_conv(x, base, w1, w2, 0.5), want) <= 1e-12


def test_conv1d_effective_conv_works_and_equals_its_dense_kernel():
    base = torch.nn.Conv1d(8, 12, 3, padding=1).double()
    layer = LoKrLayer(base, "a", r=1, alpha=2, use_effective_conv2d=True, init_weights=False).double()
    assert "lokr_t2" in layer.adapter_tensors("a")
    x = torch.randn(2, 8, 7, dtype=torch.float64)
    want = base._conv_forward(x, base.weight + layer.delta_weight("a"), base.bias)
    assert max_diff(layer(x), want) <= 1e-12


def test_rank_dropout_scale_masks_repeat_peft(tmp_path):
    kwargs = dict(target_modules=["c2", "proj"], r=1, rank_dropout=0.5, module_dropout=0.2, rank_dropout_scale=True,
                  init_weights=False)
    theirs = peft.get_peft_model(conv_net(groups=1), peft.LoKrConfig(**kwargs))
    theirs.save_pretrained(str(tmp_path))
    ours = lt.load_adapter(conv_net(groups=1), str(tmp_path), is_trainable=True)
    theirs.train()
    ours.train()
    inputs = conv_inputs()
    for seed in range(5):
        torch.manual_seed(seed)
        want = call(theirs, inputs)
        torch.manual_seed(seed)
        assert max_diff(call(ours, inputs), want) <= 1e-5


def test_merge_and_unload_keeps_outputs():
    net, inputs, want = trained_conv_net(lt.LoKrConfig(target_modules=["c1", "c2", "proj"], r=1, init_weights=False))
    lt.merge_and_unload(net, safe_merge=True)
    assert type(net.proj) is torch.nn.Linear and type(net.c1) is torch.nn.Conv1d
    assert max_diff(call(net, inputs), want) <= 1e-5


def test_factors_that_do_not_factor_the_layer_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"do not factor this layer: need a\*b = out \(6\) and c\*d = in \(12\)"):
        lokr_linear(torch.randn(2, 12), torch.randn(2, 3), torch.randn(3, 5), 1.0)
    src = conv_net()
    lt.inject_lora(src, lt.LoKrConfig(target_modules=["proj"], r=8))
    lt.save_adapter(src, str(tmp_path))
    other = conv_net()
    other.proj = torch.nn.Linear(15, 6)  # 15 = 3 x 5 where the file holds a 12 = 3 x 4 factor
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"lokr_w2: shape \(3, 4\) in the file, expected \(3, 5\)"):
        lt.load_adapter(other, str(tmp_path))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items()) and len(before) == len(
        other.state_dict())
    assert not lt.nn.adapter_configs(other)


def test_lokr_config_validation():
    with pytest.raises(ValueError, match="decompose_factor"):
        lt.LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="init_weights"):
        lt.LoKrConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="peft_type"):
        lt.LoKrConfig.from_dict({"peft_type": "LOHA"})


def test_kinds_benchmark_runs_and_matches_peft_on_tiny_layers():
    from lora_triton.benchmark import kinds_bench

    cases = [c for c in kinds_bench.default_cases(widths=(16,), tokens={16: 4}) if "linear" in c.name]
    results = [kinds_bench.run_case(c, repeats=1, warmup=0) for c in cases]
    assert [r["case"] for r in results] == ["loha-linear-16", "lokr-linear-16"]
    for r in results:
        assert r["max_abs_diff_vs_peft"] <= 1e-5 and set(r["saved_bytes"]) == {"base", "lora_triton", "peft"}
    assert "loha-linear-16" in kinds_bench.format_table(results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters_and_its_dtype(dtype, tmp_path):
    inputs = conv_inputs()
    ref = conv_net(groups=1)
    lt.inject_lora(ref, lt.LoraConfig(target_modules=["emb", "c1"], r=2, init_lora_weights=False), "lora")
    lt.inject_lora(ref, lt.LoHaConfig(target_modules=["c2", "proj"], r=2, init_weights=False), "loha")
    lt.inject_lora(ref, lt.LoKrConfig(target_modules=["head"], r=1, init_weights=False), "lokr")
    lt.set_adapter(ref, ["lora", "loha", "lokr"])
    want = call(ref, inputs)
    half = conv_net(groups=1).to(dtype)
    for name in ("lora", "loha", "lokr"):
        lt.save_adapter(ref, str(tmp_path / name), name)
        lt.load_adapter(half, str(tmp_path / name), name)
    lt.set_adapter(half, ["lora", "loha", "lokr"])
    assert half.proj.hada_w1_a["loha"].dtype == torch.float32  # adapters stay fp32 (PEFT's default)
    got = call(half, {"ids": inputs["ids"], "img": inputs["img"].to(dtype)})
    assert got.dtype == dtype
    assert max_diff(got, want) <= 0.05 * (1 + want.abs().max().item())


def test_fused_lokr_linear_compiles_without_graph_breaks():
    # The hand-written chain is an autograd.Function: torch.compile(fullgraph=True) traces through it, in
    # training too (module_dropout 0: PEFT's rand(1) draw is made but not branched on).
    model = lt.inject_lora(torch.nn.Sequential(torch.nn.Linear(64, 48)), lt.LoKrConfig(target_modules=["0"], r=2,
                                                                                      init_weights=False)).train()
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model(x)
    assert max_diff(got, want) <= 1e-6
    (g_got,), (g_want,) = torch.autograd.grad(got.sum(), [x]), torch.autograd.grad(want.sum(), [x])
    assert max_diff(g_got, g_want) <= 1e-6
