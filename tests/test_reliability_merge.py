"""Issue 8, merging: safe_merge checks what would be written (after the cast to the base dtype),
and adapter_names=[] merges nothing (PEFT's rule)."""

from __future__ import annotations

import pytest
import torch
from models import model_input, randomize_lora, run, tiny_mlp
from reliability_common import assert_same, fingerprint

import lora_triton
from lora_triton.nn import lora_layers


def _model(dtype, value, nf4=False):
    base = tiny_mlp(dtype=dtype)
    if nf4:  # 4-bit base: the merge writes a new Linear in the compute dtype
        lora_triton.quantize(base, compute_dtype=dtype, target_modules=["up"])
    model = lora_triton.inject_lora(base, lora_triton.LoraConfig(target_modules=["up"], r=2))
    randomize_lora(model)
    layer = model.layers[0].up
    with torch.no_grad():  # s * B A reaches `value` at [0, 0]: finite in fp32, not in the base dtype
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 0] = 1.0
        layer.lora_B["default"].weight[0, 0] = value / layer.scaling["default"]
    return model


@pytest.mark.parametrize("dtype, value", [(torch.float16, 1e5), (torch.bfloat16, 3.4e38)])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload", "layer", "nf4_model", "nf4_layer"])
def test_safe_merge_refuses_overflow_in_the_base_dtype(dtype, value, how):
    model = _model(dtype, value, nf4=how.startswith("nf4"))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=rf"non-finite weights in {dtype}; nothing was changed"):
        if how in ("merge_adapter", "nf4_model"):
            lora_triton.merge_adapter(model, safe_merge=True)
        elif how == "merge_and_unload":
            lora_triton.merge_and_unload(model, safe_merge=True)
        else:
            model.layers[0].up.merge(safe_merge=True)
    assert_same(before, fingerprint(model))


def test_safe_merge_still_merges_finite_half_precision():
    model = _model(torch.float16, 100.0)
    lora_triton.merge_adapter(model, safe_merge=True)
    assert model.layers[0].up.merged_adapters == ["default"]
    assert model.layers[0].up.base_layer.weight.isfinite().all()


@pytest.mark.parametrize("fn", [lora_triton.merge_adapter, lora_triton.merge_and_unload])
def test_empty_adapter_names_merges_nothing(fn):
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["up", "down"], r=2))
    randomize_lora(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    fn(model, adapter_names=[])
    if fn is lora_triton.merge_adapter:
        assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))
        for n, p in model.named_parameters():
            if n in base:
                assert torch.equal(p, base[n]), n
    else:  # unloaded with nothing merged: the plain base model
        inputs = model_input("mlp")
        with torch.no_grad():
            assert torch.equal(run(model, inputs), run(tiny_mlp(), inputs))


def _two_layer_model():
    """Adapters 'a' and 'b' (lora_bias) on both up layers; layers.1.up's base has no bias."""
    model = tiny_mlp()
    model.layers[1].up = torch.nn.Linear(32, 48, bias=False)
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"], r=2), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"], r=2, lora_bias=True), "b")
    randomize_lora(model)
    return model


def test_merge_refused_by_one_layer_changes_no_layer():
    model = _two_layer_model()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"layers\.1\.up: cannot merge lora_bias.*nothing was changed"):
        lora_triton.merge_adapter(model, adapter_names=["a", "b"])
    assert_same(before, fingerprint(model))


def test_delete_refused_by_one_layer_changes_no_layer():
    model = _two_layer_model()
    model.layers[1].up.merge(["a"])
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"is merged; unmerge before deleting it \(merged in \['layers\.1\.up'\]\)"):
        lora_triton.delete_adapter(model, "a")
    assert_same(before, fingerprint(model))
