"""LoHa (peft_type LOHA): PEFT's format both ways on Linear / Conv1d / Conv2d (outputs and gradients after
training), the Khatri-Rao form against the dense Hadamard math in fp64, rank/module dropout as PEFT's,
merge / safe_merge, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from kinds_models import call, conv_inputs, conv_net, max_diff, peft_both_ways, trained_conv_net

import lora_triton as lt
from lora_triton.nn.loha import LoHaLayer
from lora_triton.ops.loha import (
    dense_delta,
    khatri_rao,
    loha_conv,
    loha_linear,
    loha_tucker_conv,
    use_factored,
    use_factored_tucker,
)

peft = pytest.importorskip("peft", reason="PEFT is the oracle for the LoHa format")


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["c1", "c2", "proj", "head"], r=2, alpha=3),
    dict(target_modules=["c2", "proj"], r=3, alpha=5, use_effective_conv2d=True, rank_pattern={"proj": 2},
         alpha_pattern={"c2": 2}),
], ids=["linear-conv", "effective-conv-patterns"])
def test_loha_peft_both_ways(kwargs, tmp_path):
    # PEFT 0.21.2's HadaWeightCP.backward builds the w1_a gradient from the t2/w2 factors (and w2_a's from
    # t1/w1): wrong; ours is checked against finite differences in test_effective_conv_gradcheck.
    wrong = ("hada_w1_a", "hada_w2_a") if kwargs.get("use_effective_conv2d") else ()
    peft_both_ways(conv_net, conv_inputs(), peft.LoHaConfig(init_weights=False, **kwargs), tmp_path,
                   wrong_peft_grads=wrong)


def test_effective_conv_gradcheck():
    base = torch.nn.Conv2d(2, 3, (2, 3), padding=1).double()
    layer = LoHaLayer(base, "a", r=2, alpha=3, use_effective_conv2d=True, init_weights=False).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    names = [f"{k}.a" for k in layer.adapter_tensors("a")]
    assert "hada_t1.a" in names
    values = [p.detach().clone().requires_grad_(True) for p in layer.adapter_tensors("a").values()]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x,)), values)


def _factors(out, k, r1, r2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in ((out, r1), (r1, k), (out, r2),
                                                                                   (r2, k))]


@pytest.mark.parametrize("out,k,r1,r2", [(7, 5, 1, 1), (13, 9, 3, 2), (4, 17, 2, 5)])
def test_khatri_rao_equals_hadamard_fp64(out, k, r1, r2):
    w = _factors(out, k, r1, r2)
    p, q = khatri_rao(*w)
    assert p.shape == (out, r1 * r2) and q.shape == (r1 * r2, k)
    assert max_diff(p @ q, dense_delta(*w)) <= 1e-12


@pytest.mark.parametrize("m", [1, 6])
def test_factored_linear_forward_and_gradients_equal_dense_fp64(m):
    w = _factors(11, 9, 2, 3)
    x = torch.randn(m, 3, 9, dtype=torch.float64, requires_grad=True)
    row = torch.rand(11, dtype=torch.float64) + 0.5
    outs, grads = [], []
    for form in ("factored", "dense"):
        y = loha_linear(x, *w, 0.7, row, form=form)
        outs.append(y)
        grads.append(torch.autograd.grad(y.pow(2).sum(), [x, *w]))
    assert max_diff(outs[0], outs[1]) <= 1e-10
    want = x @ (dense_delta(*w) * 0.7 * row[:, None]).t()
    assert max_diff(outs[0], want) <= 1e-10
    for a, b in zip(*grads):  # the fused op accumulates adapter gradients in fp32 (ops/lora_linear.py)
        assert max_diff(a, b) <= 1e-6 * (1 + b.abs().max().item())


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 2)])
def test_factored_conv_equals_dense_fp64(stride, dilation):
    base = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=2, dilation=dilation, padding_mode="reflect").double()
    w = _factors(6, 4 * 9, 2, 2)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    a = loha_conv(x, base, *w, 1.3, form="factored")
    b = loha_conv(x, base, *w, 1.3, form="dense")
    assert max_diff(a, b) <= 1e-10


def test_form_rule_documented_cases():
    assert use_factored(64, 1024, 1024, 2048)  # r=8 on a 1024 layer
    assert not use_factored(1024, 1024, 1024, 2048)  # r=32: rank r^2 = the layer width
    assert use_factored(64, 1024, 1024, 1)  # one token (decode): never build the 1024 x 1024 dW
    assert not use_factored(64, 32, 48, 100)  # r=8 on a 32 x 48 layer: r^2 exceeds the layer's rank


def test_rank_and_module_dropout_repeat_peft_masks(tmp_path):
    kwargs = dict(target_modules=["c2", "proj"], r=2, rank_dropout=0.4, module_dropout=0.3, init_weights=False)
    inputs = conv_inputs()
    theirs = peft.get_peft_model(conv_net(), peft.LoHaConfig(**kwargs))
    theirs.save_pretrained(str(tmp_path))
    ours = lt.load_adapter(conv_net(), str(tmp_path), is_trainable=True)
    theirs.train()
    ours.train()
    for seed in range(6):
        torch.manual_seed(seed)
        want = call(theirs, inputs)
        torch.manual_seed(seed)
        assert max_diff(call(ours, inputs), want) <= 1e-5
    ours.eval()
    assert ours.c2.training is False


def test_merge_unmerge_safe_merge():
    net, inputs, want = trained_conv_net(lt.LoHaConfig(target_modules=["c2", "proj"], r=2, init_weights=False))
    lt.merge_adapter(net)
    assert max_diff(call(net, inputs), want) <= 1e-5
    lt.unmerge_adapter(net)
    assert max_diff(call(net, inputs), want) <= 1e-5
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.proj.hada_w1_a["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        lt.merge_adapter(net, safe_merge=True)
    assert all(torch.equal(v, net.state_dict()[k]) or k.endswith("hada_w1_a.default") for k, v in before.items())
    assert not net.c2.merged_adapters


def test_mixed_kinds_on_one_model_and_one_kind_per_module(tmp_path):
    net = conv_net()
    lt.inject_lora(net, lt.LoraConfig(target_modules=["emb", "head"], r=2, init_lora_weights=False), "lora")
    lt.inject_lora(net, lt.LoHaConfig(target_modules=["c2", "proj"], r=2, init_weights=False), "loha")
    lt.set_adapter(net, ["lora", "loha"])
    assert isinstance(net.proj, LoHaLayer)
    with pytest.raises(TypeError, match="one kind per module"):
        lt.inject_lora(net, lt.LoraConfig(target_modules=["proj"]), "again")
    for name in ("lora", "loha"):
        lt.save_adapter(net, str(tmp_path / name), name)
    fresh = conv_net()
    lt.load_adapter(fresh, str(tmp_path / "lora"), "lora")
    lt.load_adapter(fresh, str(tmp_path / "loha"), "loha")
    lt.set_adapter(fresh, ["lora", "loha"])
    inputs = conv_inputs()
    assert max_diff(call(fresh, inputs), call(net, inputs)) <= 1e-6


def test_loha_file_for_another_width_is_a_clear_error(tmp_path):
    src = conv_net()
    lt.inject_lora(src, lt.LoHaConfig(target_modules=["proj"], r=2))
    lt.save_adapter(src, str(tmp_path))
    other = conv_net()
    other.proj = torch.nn.Linear(12, 7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"hada_w1_a: shape \(6, 2\) in the file, expected \(7, 2\)"):
        lt.load_adapter(other, str(tmp_path))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items()) and len(before) == len(
        other.state_dict())


def test_loha_refuses_embedding_by_name():
    with pytest.raises(TypeError, match="LOHA adapters in lora_triton support nn.Linear / nn.Conv1d / nn.Conv2d"):
        lt.inject_lora(conv_net(), lt.LoHaConfig(target_modules=["emb"]))


def _both_forms_fp64(fn, x, params, row):
    """Outputs and gradients (x, every factor) of ``fn(x, form, row)`` in the factored and the dense form."""
    res = []
    for form in ("factored", "dense"):
        y = fn(x, form, row)
        dy = torch.ones_like(y).cumsum(-1).sin()
        res.append((y, torch.autograd.grad(y, [x, *params], dy)))
    return res


@pytest.mark.parametrize("conv,groups,stride,dilation,mode", [
    (torch.nn.Conv2d, 1, 1, 1, "zeros"), (torch.nn.Conv2d, 2, 2, 1, "reflect"), (torch.nn.Conv2d, 3, 1, 2, "circular"),
    (torch.nn.Conv1d, 2, 1, 1, "replicate")])
def test_factored_effective_and_grouped_convs_equal_dense_fp64(conv, groups, stride, dilation, mode):
    # The Tucker form (1x1 conv, core conv, 1x1 conv) and the grouped plain form against the dense kernels.
    base = conv(6, 6, 3, stride=stride, padding=dilation, dilation=dilation, padding_mode=mode, groups=groups).double()
    x = torch.randn(2, 6, *([7] * (base.weight.dim() - 2)), dtype=torch.float64, requires_grad=True)
    row = torch.rand(6, dtype=torch.float64) + 0.5
    for effective in (True, False):
        layer = LoHaLayer(base, "a", r=2, alpha=3, use_effective_conv2d=effective, init_weights=False).double()
        t = layer.adapter_tensors("a")
        assert ("hada_t1" in t) is effective
        if effective:
            def fn(x, form, row, t=t):
                return loha_tucker_conv(x, base, t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"],
                                        t["hada_w2_a"], t["hada_w2_b"], 0.7, row, form)
        else:
            def fn(x, form, row, t=t):
                return loha_conv(x, base, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], 0.7, row,
                                 form)
        (ya, ga), (yb, gb) = _both_forms_fp64(fn, x, list(t.values()), row)
        assert max_diff(ya, yb) <= 1e-10
        delta = layer.delta_weight("a") * (0.7 / layer.scaling["a"]) * row.reshape(-1, *[1] * (x.dim() - 1))
        want = base._conv_forward(x, delta, None)
        assert max_diff(ya, want) <= 1e-10
        for u, v in zip(ga, gb):
            assert max_diff(u, v) <= 1e-10


def test_tucker_rule_picks_factored_for_wide_convs_only():
    # r = 4 (rank 16) on a 320-channel 3x3 conv at 64x64: factored; r = 8 (rank 64) on a 16-channel one: dense.
    assert use_factored_tucker(16, 320, 320, 1, 9, 64 * 64, 64 * 64)
    assert not use_factored_tucker(64, 16, 16, 1, 9, 32 * 32, 32 * 32)
