"""Issue 8, config half: every field's type and value is checked up front, with a clear error
naming the field, and config regexes can neither crash nor hang the loader."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lora_triton
from lora_triton import LoraConfig, patterns


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=True), "r must be a positive int"),
    (dict(r="8"), "r must be a positive int"),
    (dict(target_modules=123), "target_modules must be"),
    (dict(target_modules=["q", 1]), "target_modules must be"),
    (dict(exclude_modules=5), "exclude_modules must be"),
    (dict(layers_to_transform="abc"), "layers_to_transform"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform"),
    (dict(layers_to_transform=[True]), "layers_to_transform"),
    (dict(use_rslora="yes"), "use_rslora must be a bool"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out must be a bool"),
    (dict(lora_bias="no"), "lora_bias must be a bool"),
    (dict(inference_mode=None), "inference_mode must be a bool"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a number"),
    (dict(lora_alpha="16"), "lora_alpha must be a number"),
    (dict(lora_alpha=True), "lora_alpha must be a number"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be finite"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be finite"),
    (dict(alpha_pattern={"up": "x"}), r"alpha_pattern\['up'\] must be a number"),
    (dict(alpha_pattern={"up": float("-inf")}), r"alpha_pattern\['up'\] must be finite"),
    (dict(rank_pattern={"up": 2.5}), r"rank_pattern\['up'\] must be a positive int"),
    (dict(modules_to_save="head"), "modules_to_save must be a list"),
    (dict(layers_pattern=[3], layers_to_transform=[0]), "layers_pattern must be a list"),
    (dict(task_type=7), "task_type must be a string"),
    (dict(target_modules="(q|v"), r"target_modules: invalid regular expression '\(q\|v'"),
    (dict(exclude_modules="*x"), "exclude_modules: invalid regular expression"),
    (dict(rank_pattern={"[a": 2}), "rank_pattern key: invalid regular expression"),
    (dict(alpha_pattern={"(": 2}), "alpha_pattern key: invalid regular expression"),
    (dict(modules_to_save=["he(ad"]), "modules_to_save entry: invalid regular expression"),
])
def test_bad_field_is_a_clear_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_field_changed_after_construction_is_caught_before_injection(tmp_path):
    from models import tiny_mlp

    cfg = LoraConfig(target_modules=["up"])
    cfg.lora_alpha = float("nan")
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        lora_triton.inject_lora(model, cfg)
    assert not lora_triton.nn.lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_valid_values_still_accepted():
    cfg = LoraConfig(r=4, lora_alpha=8.5, lora_dropout=0, target_modules=("v", "q"), layers_to_transform=1,
                     layers_pattern="layers", modules_to_save=("head",), alpha_pattern={"up": 2})
    assert cfg.target_modules == ["q", "v"] and cfg.modules_to_save == ["head"]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(target_modules=r".*\.(up|down)").scaling_for("layers.0.up") == 1.0


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"r": 4, "lora_alpha": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not UTF-8"):
        LoraConfig.from_pretrained(str(tmp_path))


def test_json_nan_alpha_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": float("nan")}))
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        LoraConfig.from_pretrained(str(tmp_path))


class _LongNames(nn.Module):
    """A module path long enough for an exponential pattern to take minutes (names are free-form)."""

    def __init__(self):
        super().__init__()
        self.add_module("a" * 40, nn.Linear(4, 4))


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern", "modules_to_save"])
def test_catastrophic_regex_is_bounded(monkeypatch, field):
    # Python's re (and PEFT) spends about 2**40 steps on this; the bounded matcher gives up.
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT_S", 0.05)
    evil = "(a|aa)+b"
    kwargs = {"target_modules": evil} if field == "target_modules" else {
        "target_modules": ["a" * 40], field: ({evil: 2} if field == "rank_pattern" else
                                             [evil] if field == "modules_to_save" else evil)}
    model = _LongNames()
    with pytest.raises(ValueError, match=rf"{field}: pattern .* took over 0.05 s.*catastrophic backtracking"):
        lora_triton.inject_lora(model, LoraConfig(**kwargs))
    assert isinstance(model.get_submodule("a" * 40), nn.Linear)
