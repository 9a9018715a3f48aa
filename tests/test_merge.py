"""merge / unmerge / merge_and_unload / several active adapters / disable_adapters / safe_merge."""

from __future__ import annotations

import peft
import pytest
import torch
from models import BUILDERS, max_diff, model_input, randomize_lora, run

import lora_triton
from lora_triton.nn import LoraLinear, ModulesToSaveWrapper, lora_layers

TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj"], "gpt2": ["c_attn", "c_fc"], "mlp": ["up", "down", "inp"]}


def _model(kind, dtype=torch.float32, lora_bias=False, **extra):
    model = BUILDERS[kind](dtype=dtype)
    cfg = lora_triton.LoraConfig(target_modules=TARGETS[kind], r=4, lora_alpha=8, lora_bias=lora_bias, **extra)
    lora_triton.inject_lora(model, cfg)
    randomize_lora(model, seed=1, scale=0.1)
    return model.eval()


def _base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_merge_unmerge_fp32(kind):
    model = _model(kind, lora_bias=kind == "mlp")
    inputs = model_input(kind)
    before = _base_state(model)
    with torch.no_grad():
        expected = run(model, inputs)
        lora_triton.merge_adapter(model)
        assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))
        assert max_diff(run(model, inputs), expected) <= 1e-5
        changed = [n for n, p in _base_state(model).items() if not torch.equal(p, before[n])]
        assert changed and all("base_layer" in n for n in changed)
        lora_triton.unmerge_adapter(model)
        assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))
        for n, p in _base_state(model).items():
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)
        assert max_diff(run(model, inputs), expected) <= 1e-5


def test_merge_matches_peft_merge():
    kind = "mlp"
    model = _model(kind, lora_bias=True)
    theirs = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(target_modules=TARGETS[kind], r=4, lora_alpha=8,
                                                                      lora_bias=True))
    randomize_lora(theirs, seed=1, scale=0.1)
    lora_triton.merge_adapter(model)
    theirs.merge_adapter()
    ours = dict(model.named_parameters())
    for name, p in theirs.named_parameters():
        if "base_layer" in name:
            torch.testing.assert_close(ours[name.removeprefix("base_model.model.")], p, rtol=0, atol=1e-6)


def test_merge_unmerge_bf16_within_one_rounding():
    kind = "mlp"
    model = _model(kind, dtype=torch.bfloat16, lora_bias=True)
    layers = lora_layers(model)
    before = _base_state(model)
    deltas = {}
    for path, layer in layers:
        deltas[path] = layer.delta_weight("default")
        merged_exact = layer.base_layer.weight.float() + deltas[path]
        layer.merge()
        # Merging rounds once, from fp32.
        assert torch.equal(layer.base_layer.weight, merged_exact.to(torch.bfloat16))
    lora_triton.unmerge_adapter(model)
    for name, p in _base_state(model).items():
        ref = before[name].float()
        # One bf16 rounding step of the merged value (ulp at its magnitude) bounds the error.
        ulp = torch.finfo(torch.bfloat16).eps * (ref.abs() + 1.0)
        assert ((p.float() - ref).abs() <= ulp).all(), name
    assert all(p.dtype == torch.bfloat16 for n, p in _base_state(model).items())


def test_merged_outputs_equal_unmerged_bf16():
    model = _model("mlp", dtype=torch.bfloat16)
    x = model_input("mlp")["x"].to(torch.bfloat16)
    with torch.no_grad():
        unmerged = model(x).float()
        lora_triton.merge_adapter(model)
        merged = model(x).float()
    assert (unmerged - merged).abs().max().item() <= 0.05 * unmerged.abs().max().item()


def test_merge_and_unload_gives_plain_model():
    kind = "gpt2"
    model = _model(kind)
    inputs = model_input(kind)
    with torch.no_grad():
        expected = run(model, inputs)
        plain = lora_triton.merge_and_unload(model)
        assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in plain.modules())
        assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
        assert max_diff(run(plain, inputs), expected) <= 1e-5
    assert set(plain.state_dict()) == set(BUILDERS[kind]().state_dict())


def test_merge_and_unload_keeps_modules_to_save_copy():
    model = _model("mlp", modules_to_save=["head"])
    with torch.no_grad():
        model.head.modules_to_save["default"].weight.add_(1.0)
    inputs = model_input("mlp")
    with torch.no_grad():
        expected = run(model, inputs)
        plain = lora_triton.merge_and_unload(model)
        assert isinstance(plain.head, torch.nn.Linear)
        assert max_diff(run(plain, inputs), expected) <= 1e-5


def _two_adapters(kind="mlp"):
    model = BUILDERS[kind]()
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up", "down"], r=4), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up", "inp"], r=2, lora_alpha=5,
                                                          use_rslora=True), "b")
    randomize_lora(model, seed=4, scale=0.1)
    return model.eval()


def test_two_adapters_active_is_sum_of_deltas():
    model = _two_adapters()
    assert lora_triton.active_adapters(model) == ["a"]  # adding "b" does not switch
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer = model.layers[0].up
        h = torch.randn(5, 32)
        lora_triton.set_adapter(model, "a")
        ya = layer(h)
        lora_triton.set_adapter(model, "b")
        yb = layer(h)
        lora_triton.set_adapter(model, ["a", "b"])
        yab = layer(h)
        with lora_triton.disable_adapters(model):
            y0 = layer(h)
            base = run(model, {"x": x})
        torch.testing.assert_close(yab - y0, (ya - y0) + (yb - y0), rtol=1e-5, atol=1e-5)
        # Whole model: merged both == both active; the sum of deltas is what merge folds in.
        both = run(model, {"x": x})
        assert max_diff(both, base) > 1e-3
        lora_triton.merge_adapter(model)
        assert model.layers[0].up.merged_adapters == ["a", "b"]
        assert model.inp.merged_adapters == ["b"]
        assert max_diff(run(model, {"x": x}), both) <= 1e-5
        lora_triton.unmerge_adapter(model)
        assert max_diff(run(model, {"x": x}), both) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".a." in n for n in trainable) and any(".b." in n for n in trainable)


def test_merge_named_adapter_only():
    model = _two_adapters()
    lora_triton.set_adapter(model, ["a", "b"])
    h = torch.randn(4, 32)
    layer = model.layers[0].up
    with torch.no_grad():
        y = layer(h)
        lora_triton.merge_adapter(model, ["b"])
        assert layer.merged_adapters == ["b"]
        torch.testing.assert_close(layer(h), y, rtol=1e-5, atol=1e-5)  # "a" still runs unmerged


def test_disable_adapters_context():
    kind = "llama"
    model = _model(kind)
    inputs = model_input(kind)
    plain = BUILDERS[kind]()
    with torch.no_grad():
        base = run(plain, inputs)
        adapted = run(model, inputs)
        with lora_triton.disable_adapters(model):
            assert max_diff(run(model, inputs), base) <= 1e-6
        assert max_diff(run(model, inputs), adapted) <= 1e-6
        # An exception inside the block still restores the adapters.
        with pytest.raises(RuntimeError, match="boom"), lora_triton.disable_adapters(model):
            raise RuntimeError("boom")
        assert max_diff(run(model, inputs), adapted) <= 1e-6
        # Merged, then disabled: the base comes back.
        lora_triton.merge_adapter(model)
        with lora_triton.disable_adapters(model):
            assert max_diff(run(model, inputs), base) <= 1e-5
        assert max_diff(run(model, inputs), adapted) <= 1e-5


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = _model("mlp")
    with torch.no_grad():
        model.layers[1].down.lora_B["default"].weight[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        lora_triton.merge_adapter(model, safe_merge=True)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="non-finite"):
        lora_triton.merge_and_unload(model, safe_merge=True)
    assert len(lora_layers(model)) == 5


def test_safe_merge_refuses_non_finite_bias():
    model = _model("mlp", lora_bias=True)
    with torch.no_grad():
        model.layers[1].down.lora_B["default"].bias[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        lora_triton.merge_adapter(model, safe_merge=True)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all(), n
    assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))


def test_merge_unknown_adapter():
    model = _model("mlp")
    with pytest.raises(KeyError, match="nope"):
        lora_triton.merge_adapter(model, ["nope"])


def test_delete_adapter_updates_every_layer():
    model = _two_adapters()  # "a" on up/down, "b" on up/inp
    lora_triton.set_adapter(model, ["a", "b"])
    lora_triton.delete_adapter(model, "b")
    assert lora_triton.active_adapters(model) == ["a"]
    for path, layer in lora_layers(model):
        assert "b" not in layer.lora_A and layer.active_adapters == ["a"], path
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert all(p.requires_grad == (".a." in n) for n, p in model.named_parameters())
    # Deleting the only active adapter activates a remaining one (PEFT's rule); none left -> base model.
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["down"], r=2), "c")
    lora_triton.delete_adapter(model, "a")
    assert lora_triton.active_adapters(model) == ["c"]
    lora_triton.delete_adapter(model, "c")
    assert lora_triton.active_adapters(model) == []
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), BUILDERS["mlp"]()(x), rtol=0, atol=1e-6)


def test_delete_merged_adapter_refused():
    model = _model("mlp")
    lora_triton.merge_adapter(model)
    with pytest.raises(ValueError, match="is merged; unmerge before deleting"):
        lora_triton.delete_adapter(model, "default")
