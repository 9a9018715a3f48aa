"""LoRA on nn.Conv1d/2d/3d: PEFT's format both ways, its outputs and gradients; dilation, padding_mode,
groups, merge / unmerge against fp64 dense math; bad files and ranks are clear errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from kinds_models import call, conv_inputs, conv_net, max_diff, peft_both_ways, trained_conv_net

import lora_triton as lt
from lora_triton.nn.lora_conv import LoraConv

peft = pytest.importorskip("peft", reason="PEFT is the oracle for the conv LoRA format")


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["c1", "c2", "c3"], r=4, lora_alpha=8),
    dict(target_modules=["c2", "c3", "proj"], r=2, lora_alpha=3, use_rslora=True, lora_bias=True,
         rank_pattern={"c3": 3}, alpha_pattern={"c2": 5}),
], ids=["conv123", "bias-patterns"])
def test_conv_lora_peft_both_ways(kwargs, tmp_path):
    cfg = peft.LoraConfig(init_lora_weights=False, **kwargs)
    peft_both_ways(conv_net, conv_inputs(), cfg, tmp_path)


def _dense_reference(layer: LoraConv, x: torch.Tensor) -> torch.Tensor:
    """conv(x, W + s B A) in fp64 with the base's stride, padding, dilation and padding_mode."""
    base = layer.base_layer
    w = base.weight.double() + sum(layer.delta_weight(n).double() for n in layer.active_adapters)
    b = None if base.bias is None else base.bias.double()
    return base._conv_forward(x.double(), w, b)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_dilated_padded_conv_equals_merged_dense_math(padding_mode):
    net = conv_net(dilation=2, padding_mode=padding_mode)
    lt.inject_lora(net, lt.LoraConfig(target_modules=["c2"], r=3, lora_alpha=6, init_lora_weights=False))
    x = torch.randn(2, 3, 13, 10)
    layer = net.c2
    assert layer.lora_A["default"].dilation == (2, 2) and layer.lora_A["default"].padding_mode == padding_mode
    ref = _dense_reference(layer, x)
    assert max_diff(layer(x), ref) <= 1e-5
    before = layer.base_layer.weight.clone()
    lt.merge_adapter(net)
    assert max_diff(layer(x), ref) <= 1e-5
    lt.unmerge_adapter(net)
    assert max_diff(layer.base_layer.weight, before) <= 1e-6


def test_conv3d_and_strided_merge_and_unload_keeps_outputs():
    net, inputs, want = trained_conv_net(lt.LoraConfig(target_modules=["c2", "c3"], r=2, init_lora_weights=False))
    lt.merge_and_unload(net)
    assert type(net.c2) is torch.nn.Conv2d and type(net.c3) is torch.nn.Conv3d
    assert max_diff(call(net, inputs), want) <= 1e-5


def test_grouped_conv_forward_and_merge_refused():
    net = conv_net(groups=4)
    lt.inject_lora(net, lt.LoraConfig(target_modules=["c1"], r=4, init_lora_weights=False))
    layer = net.c1
    assert tuple(layer.lora_B["default"].weight.shape) == (12, 1, 1)  # PEFT's layout: [out, r / groups, 1]
    x = torch.randn(2, 8, 7, dtype=torch.float64)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    base = layer.base_layer
    want = F.conv1d(x, base.weight.double(), base.bias.double(), padding=1, groups=4) + layer.scaling["default"] * \
        F.conv1d(F.conv1d(x, a, padding=1), b, groups=4)
    assert max_diff(layer(x.float()), want) <= 1e-5
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NotImplementedError, match="groups=4"):
        lt.merge_adapter(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_rank_not_divisible_by_groups_is_a_clear_error():
    net = conv_net(groups=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="divisible by groups"):
        lt.inject_lora(net, lt.LoraConfig(target_modules=["c1"], r=3))
    assert set(net.state_dict()) == set(before)


def test_kernel_mismatch_in_file_is_a_clear_error_model_untouched(tmp_path):
    src = conv_net()
    lt.inject_lora(src, lt.LoraConfig(target_modules=["c2"], r=2, init_lora_weights=False))
    lt.save_adapter(src, str(tmp_path))
    other = functools.partial(conv_net)()
    other.c2 = torch.nn.Conv2d(3, 10, 5, stride=2, padding=2)  # 5x5 kernel where the file holds 3x3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_A.weight: shape \(2, 3, 3, 3\) in the file, expected \(2, 3, 5, 5\)"):
        lt.load_adapter(other, str(tmp_path))
    assert set(other.state_dict()) == set(before)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    assert not lt.nn.adapter_configs(other)


def test_conv_transpose_is_refused_by_name():
    net = conv_net()
    net.c2 = torch.nn.ConvTranspose2d(3, 10, 3)
    with pytest.raises(TypeError, match="ConvTranspose2d.*nn.Conv1d/2d/3d"):
        lt.inject_lora(net, lt.LoraConfig(target_modules=["c2"]))


def test_failed_inject_half_way_leaves_the_model_bit_identical():
    net = conv_net(groups=1)
    net.c3 = torch.nn.Conv3d(10, 6, (1, 2, 2), groups=2)  # r=3 does not divide by its groups: fails after c1, c2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kinds_before = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match="divisible by groups"):
        lt.inject_lora(net, lt.LoraConfig(target_modules=["c1", "c2", "c3"], r=3))
    assert [type(m) for m in net.modules()] == kinds_before
    assert set(net.state_dict()) == set(before)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_mixed_batch_rows_on_conv_embedding_loha_lokr_match_one_adapter_per_call():
    net = conv_net(groups=1)
    lt.inject_lora(net, lt.LoraConfig(target_modules=["emb", "c1", "c3", "proj"], r=2, init_lora_weights=False),
                   "lora")
    lt.inject_lora(net, lt.LoHaConfig(target_modules=["c2"], r=2, init_weights=False), "loha")
    lt.inject_lora(net, lt.LoKrConfig(target_modules=["head"], r=1, init_weights=False), "lokr")
    names = ["lora", None, "loha", "lokr", "lora"]
    inputs = conv_inputs(batch=5)
    with torch.no_grad(), lt.adapter_batch(net, names):
        mixed = call(net, inputs)
    for i, name in enumerate(names):
        if name is None:
            with lt.disable_adapters(net):
                alone = call(net, {k: v[i:i + 1] for k, v in inputs.items()})
        else:
            lt.set_adapter(net, name)
            alone = call(net, {k: v[i:i + 1] for k, v in inputs.items()})
        assert max_diff(mixed[i:i + 1], alone) <= 1e-5, (i, name)
    assert net.c2.mixed_batch is None  # the hooks are gone after the block


def test_mixed_batch_row_indices_made_under_inference_mode_are_not_reused_with_grad():
    # The per-name row index tensors are cached per batch size: one made under inference mode must not
    # reach a later forward whose backward would save it ("Inference tensors cannot be saved").
    net = conv_net(groups=1)
    lt.inject_lora(net, lt.LoHaConfig(target_modules=["c2"], r=2, init_weights=False), "loha")
    lt.inject_lora(net, lt.LoKrConfig(target_modules=["head"], r=1, init_weights=False), "lokr")
    names = ["loha", None, "lokr"]
    inputs = conv_inputs(batch=3)
    with lt.adapter_batch(net, names):
        with torch.inference_mode():
            first = call(net, inputs)
        again = call(net, inputs)
        again.float().sum().backward()
    assert torch.equal(first, again.detach())
    assert any(p.grad is not None for n, p in net.named_parameters() if "hada" in n or "lokr" in n)


def test_kinds_bench_cli_writes_a_result(tmp_path):
    # The benchmark module's CLI (the device check runs it with --device cuda --quick): one small case, CPU.
    import json

    from lora_triton.benchmark import kinds_bench

    out = tmp_path / "kinds.json"
    assert kinds_bench.main(["--only", "lora-conv2d", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and [r["case"] for r in doc["results"]] == [
        "lora-conv2d"]
    row = doc["results"][0]
    assert row["max_abs_diff_vs_peft"] <= 1e-4 and set(row["median_s"]) == {"base", "lora_triton", "peft"}
