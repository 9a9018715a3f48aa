"""Issue 8, loading: a failed load_adapter / inject_lora leaves the model bit-identical (and a retry
works), keys are resolved against the names the model has after injection, adapter names are one
path component, and shape errors name the dimension that differs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import model_input, randomize_lora, run, tiny_mlp
from reliability_common import assert_same, fingerprint
from safetensors.torch import load_file, save_file

import lora_triton
import lora_triton.io.peft_format as peft_format
from lora_triton.nn import LoraLinear

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _save(tmp_path, name="adapter", **cfg):
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(**{"target_modules": ["up", "down"], "r": 4,
                                                                          **cfg}))
    randomize_lora(model)
    directory = tmp_path / name
    lora_triton.save_adapter(model, str(directory))
    return model, directory


def _edit(directory, config=None, weights=None):
    if config is not None:
        data = json.loads((directory / CONFIG).read_text())
        data.update(config)
        (directory / CONFIG).write_text(json.dumps(data))
    if weights is not None:
        tensors = load_file(directory / WEIGHTS)
        weights(tensors)
        save_file(tensors, directory / WEIGHTS)


def _fails_untouched(model, directory, match, exc=ValueError, **kwargs):
    before = fingerprint(model)
    with pytest.raises(exc, match=match):
        lora_triton.load_adapter(model, str(directory), **kwargs)
    assert_same(before, fingerprint(model))


@pytest.mark.parametrize("edit, match", [
    # A plain key naming a targeted module's own weight: after injection it is `up.base_layer.weight`.
    (dict(weights=lambda t: t.__setitem__("base_model.model.layers.0.up.weight", torch.zeros(48, 32))),
     r"'layers\.0\.up' is targeted, so its tensors are named layers\.0\.up\.base_layer\.<name>"),
    (dict(config={"lora_alpha": "16"}), "lora_alpha must be a number"),
    (dict(config={"alpha_pattern": {"up": [1]}}), r"alpha_pattern\['up'\] must be a number"),
    (dict(config={"modules_to_save": "head"}), "modules_to_save must be a list"),
    (dict(config={"use_rslora": "yes"}), "use_rslora must be a bool"),
    (dict(weights=lambda t: t.__setitem__("base_model.model.layers.0.up.lora_A.weight",
                                          torch.zeros(4, 32, dtype=torch.int32))), "expected a floating point"),
    (dict(weights=lambda t: t.__setitem__("base_model.model.layers.0.up.lora_A.weight", torch.zeros(4, 31))),
     r"dim 1 is 31, but the module's in_features is 32"),
    (dict(weights=lambda t: t.__setitem__("base_model.model.layers.0.up.lora_B.weight", torch.zeros(47, 4))),
     r"dim 0 is 47, but the module's out_features is 48"),
    (dict(weights=lambda t: t.__setitem__("base_model.model.layers.0.up.lora_A.weight", torch.zeros(3, 32))),
     r"dim 0 is 3, but rank disagrees with the config's r / rank_pattern \(4\)"),
])
def test_bad_file_leaves_model_bit_identical(tmp_path, edit, match):
    _, directory = _save(tmp_path)
    _edit(directory, **edit)
    model = tiny_mlp()
    _fails_untouched(model, directory, match)
    _fails_untouched(model, directory, match)  # same clear error again, never "already exists"


def _second_adapter_model(tmp_path):
    """A model holding adapter 'a' (bias='all', modules_to_save head), and a directory for 'b'."""
    _, dir_a = _save(tmp_path, "a", bias="all", modules_to_save=["head"])
    _, dir_b = _save(tmp_path, "b", bias="all", modules_to_save=["head"], r=2)
    with torch.no_grad():  # b's biases differ from the model's: loading b writes into existing tensors
        tensors = load_file(dir_b / WEIGHTS)
        for k in tensors:
            if k.endswith("bias"):
                tensors[k] = tensors[k] + 1.0
        save_file(tensors, dir_b / WEIGHTS)
    model = lora_triton.load_adapter(tiny_mlp(), str(dir_a), adapter_name="a")
    return model, dir_b


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_after_writes_rolls_everything_back(tmp_path, monkeypatch, exc):
    model, dir_b = _second_adapter_model(tmp_path)
    inputs = model_input("mlp")
    with torch.no_grad():
        expected = run(model, inputs)

    def boom(*_a, **_k):
        raise exc("simulated failure after every tensor was written")

    monkeypatch.setattr(peft_format, "set_adapter", boom)  # the last step of a trainable load
    _fails_untouched(model, dir_b, "simulated failure", exc=exc, adapter_name="b", is_trainable=True)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(run(model, inputs), expected)
    lora_triton.load_adapter(model, str(dir_b), adapter_name="b", is_trainable=True)  # the retry works
    assert sorted(lora_triton.nn.adapter_configs(model)) == ["a", "b"]


def test_failure_mid_injection_rolls_back(tmp_path, monkeypatch):
    model = tiny_mlp()
    calls = []
    real = LoraLinear.add_adapter

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise TypeError("simulated failure on the third layer")
        return real(self, *args, **kwargs)

    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"], r=2), "first")
    calls.clear()
    monkeypatch.setattr(LoraLinear, "add_adapter", flaky)
    before = fingerprint(model)
    with pytest.raises(TypeError, match="third layer"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up", "down", "inp"], r=2), "second")
    assert_same(before, fingerprint(model))


@pytest.mark.parametrize("name", ["../outside", "/abs/outside", "a/b", "..", "a\\b"])
def test_adapter_name_must_be_one_path_component(tmp_path, name):
    _, directory = _save(tmp_path, "outside")
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(ValueError, match="adapter_name"):
        lora_triton.read_peft_adapter(str(inner), adapter_name=name)
    model = tiny_mlp()
    _fails_untouched(model, inner, "adapter_name", adapter_name=name)


def test_nested_adapter_layout_still_loads(tmp_path):
    model, directory = _save(tmp_path, os.path.join("root", "task"))
    loaded = lora_triton.load_adapter(tiny_mlp(), str(tmp_path / "root"), adapter_name="task")
    inputs = model_input("mlp")
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_failure_inside_injection_during_load_rolls_back(tmp_path, monkeypatch):
    # inject_lora runs inside load_adapter's transaction (no snapshot of its own): the outer one restores.
    model, dir_b = _second_adapter_model(tmp_path)
    real, calls = LoraLinear.add_adapter, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("simulated failure on the second layer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add_adapter", flaky)
    _fails_untouched(model, dir_b, "second layer", exc=TypeError, adapter_name="b")
    monkeypatch.undo()
    lora_triton.load_adapter(model, str(dir_b), adapter_name="b")
