"""LoraConfig: PEFT's names and defaults, validation, pattern lookup, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from models import tiny_llama

import lora_triton
from lora_triton import LoraConfig


def test_defaults_match_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        if f.name in ("peft_type",):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ours.peft_type == "LORA"


def test_normalisation():
    cfg = LoraConfig(target_modules={"v", "q"}, exclude_modules=("b", "a"), layers_to_transform=3,
                     layers_pattern="h")
    assert cfg.target_modules == ["q", "v"] and cfg.exclude_modules == ["a", "b"]
    assert cfg.layers_to_transform == [3] and cfg.layers_pattern == ["h"]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(r=2.0), ValueError, "r must be a positive int"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_dropout=-0.5), ValueError, "lora_dropout"),
    (dict(bias="some"), ValueError, "bias must be one of"),
    (dict(use_dora=True, lora_bias=True), ValueError, "use_dora=True with lora_bias"),
    (dict(init_lora_weights="pissa"), NotImplementedError, "init_lora_weights='pissa'"),
    (dict(init_lora_weights="olora"), NotImplementedError, "init_lora_weights"),
    (dict(init_lora_weights="mica"), NotImplementedError, "init_lora_weights"),
    (dict(init_lora_weights=1), NotImplementedError, "init_lora_weights"),
    (dict(peft_type="IA3"), ValueError, "peft_type"),
    (dict(rank_pattern=[("q", 2)]), ValueError, "rank_pattern must be a dict"),
    (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\] must be a positive int"),
    (dict(alpha_pattern=3), ValueError, "alpha_pattern must be a dict"),
    (dict(layers_pattern="layers"), ValueError, "layers_pattern is only used together with layers_to_transform"),
])
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoraConfig(**kwargs)


def test_peft_type_enum_accepted():
    cfg = LoraConfig(peft_type=peft.PeftType.LORA)
    assert cfg.peft_type == "LORA"
    assert json.loads(json.dumps(cfg.to_peft_dict()))["peft_type"] == "LORA"


@pytest.mark.parametrize("field, value", [("megatron_config", {"a": 1}), ("layer_replication", [[0, 1]]),
                                          ("use_qalora", True), ("target_parameters", ["x.weight"]),
                                          ("trainable_token_indices", [1, 2])])
def test_from_dict_unsupported_features(field, value):
    with pytest.raises(NotImplementedError, match=field):
        LoraConfig.from_dict({"r": 2, field: value})


def test_from_dict_ignores_peft_bookkeeping_silently():
    data = {"r": 2, "peft_version": "0.21.2", "auto_mapping": None, "megatron_core": "megatron.core",
            "runtime_config": {"ephemeral_gpu_offload": False}, "loftq_config": {}, "eva_config": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_dict(data).r == 2


def test_json_round_trip(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=2.5, target_modules="foo.*", rank_pattern={"a": 2}, alpha_pattern={"b": 1},
                     layers_to_transform=[1], layers_pattern="layers", modules_to_save=["head"],
                     task_type="CAUSAL_LM", init_lora_weights="gaussian")
    cfg.save_pretrained(str(tmp_path))
    again = LoraConfig.from_pretrained(str(tmp_path))
    assert again == cfg
    assert LoraConfig.from_pretrained(str(tmp_path / "adapter_config.json")) == cfg
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["loftq_config"] == {}


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        LoraConfig.from_pretrained(str(tmp_path))


def test_patterns_first_match_wins_like_peft():
    patterns = {"layers.0.self_attn.q_proj": 7, "q_proj": 3, r"layers\.1\..*": 5}
    ours = LoraConfig(r=2, lora_alpha=4, rank_pattern=patterns, alpha_pattern={"v_proj": 9})
    assert ours.rank_for("model.layers.0.self_attn.q_proj") == 7
    assert ours.rank_for("model.layers.1.self_attn.q_proj") == 3
    assert ours.rank_for("model.layers.1.self_attn.k_proj") == 5
    assert ours.rank_for("model.layers.0.self_attn.k_proj") == 2
    assert ours.rank_for("model.layers.0.self_attn.xq_proj") == 2  # suffix on a dot boundary only
    assert ours.alpha_for("model.layers.0.self_attn.v_proj") == 9
    assert ours.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(9 / 2)


def test_scaling_matches_peft_on_a_model():
    kwargs = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=6, use_rslora=True,
                  rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 8}, alpha_pattern={"o_proj": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    model = lora_triton.inject_lora(tiny_llama(), LoraConfig(**kwargs))
    theirs = {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
              for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {p: (m.r["default"], m.scaling["default"]) for p, m in lora_triton.nn.lora_layers(model)}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k][0] == theirs[k][0], k
        assert ours[k][1] == pytest.approx(theirs[k][1], rel=1e-12), k


def test_default_targets_and_all_linear():
    model = lora_triton.inject_lora(tiny_llama(), LoraConfig())  # None -> llama's q_proj, v_proj
    paths = sorted(p for p, _ in lora_triton.nn.lora_layers(model))
    assert paths == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    model = lora_triton.inject_lora(tiny_llama(), LoraConfig(target_modules="ALL-LINEAR"))
    paths = {p for p, _ in lora_triton.nn.lora_layers(model)}
    assert "lm_head" not in paths and len(paths) == 14
    with pytest.raises(ValueError, match="no default for model type"):
        lora_triton.inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig())


def test_eva_adapter_config_is_loadable():
    cfg = LoraConfig.from_dict({"r": 4, "init_lora_weights": "eva", "eva_config": {"rho": 2.0},
                                "rank_pattern": {"q": 6}})
    assert cfg.init_lora_weights == "eva" and cfg.rank_for("a.q") == 6
    with pytest.raises(NotImplementedError, match="eva_config"):
        LoraConfig.from_dict({"r": 4, "eva_config": {"rho": 2.0}})
