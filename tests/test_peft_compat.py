"""PEFT <-> lora_triton: adapters saved by one load in the other and give the same logits (fp32, 1e-5)."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from models import BUILDERS, load_here, load_in_peft, max_diff, model_input, randomize_lora, run

import lora_triton
from lora_triton.nn import LoraLinear

TOL = 1e-5

# (model kind, PEFT LoraConfig kwargs). Every config uses non-zero B (init_lora_weights=False).
CASES = {
    "llama-list-patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                                          rank_pattern={"v_proj": 2, "layers.1.down_proj": 6},
                                          alpha_pattern={"q_proj": 16})),
    "llama-rslora-all-linear": ("llama", dict(target_modules="all-linear", r=4, lora_alpha=12, use_rslora=True)),
    "llama-layers-mts": ("llama", dict(target_modules=["q_proj", "k_proj", "o_proj"], layers_to_transform=[1],
                                       modules_to_save=["lm_head"], r=3)),
    "llama-regex": ("llama", dict(target_modules=r".*layers\.0\.mlp\.(gate|up)_proj", r=2, lora_alpha=5.5)),
    "gpt2-conv1d-lora-only": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                                           bias="lora_only", r=4)),
    "gpt2-lora-bias-all-linear": ("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True, lora_bias=True,
                                               r=2, rank_pattern={"c_fc": 5})),
    "mlp-bias-all-mts": ("mlp", dict(target_modules=["up", "down"], bias="all", modules_to_save=["head"],
                                     lora_bias=True, r=4)),
    "mlp-layers-pattern": ("mlp", dict(target_modules=["up", "down", "inp"], layers_to_transform=[0],
                                       layers_pattern="layers", r=3, use_rslora=True, lora_alpha=7)),
    "mlp-all-linear-exclude": ("mlp", dict(target_modules="all-linear", exclude_modules=["inp"], r=2,
                                           bias="lora_only")),
}


def _peft_model(kind: str, kwargs: dict, adapter_name: str = "default"):
    base = BUILDERS[kind]()
    cfg = peft.LoraConfig(init_lora_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg, adapter_name=adapter_name)
    # Biases (bias="all"/"lora_only") and modules_to_save copies: perturb them so they matter.
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


def _peft_save(pm, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about 1-D lora_B.bias tensors (ZeRO heuristics)
        pm.save_pretrained(directory)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here(case, tmp_path):
    kind, kwargs = CASES[case]
    pm = _peft_model(kind, kwargs)
    _peft_save(pm, tmp_path)
    inputs = model_input(kind)
    model, expected, got, base = load_here(pm, kind, tmp_path, inputs)
    assert max_diff(got, base) > 1e-3, "the adapter should change the logits"
    assert max_diff(got, expected) <= TOL
    ours = {p for p, _ in lora_triton.nn.lora_layers(model)}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours == theirs


@pytest.mark.parametrize("case", ["llama-list-patterns", "gpt2-lora-bias-all-linear", "mlp-bias-all-mts",
                                  "mlp-layers-pattern", "llama-layers-mts"])
def test_our_adapter_loads_in_peft(case, tmp_path):
    kind, kwargs = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}
    model = lora_triton.inject_lora(BUILDERS[kind](), lora_triton.LoraConfig(**kwargs)).eval()
    randomize_lora(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lora_triton.save_adapter(model, str(tmp_path))
    inputs = model_input(kind)
    _, expected, got = load_in_peft(model, kind, tmp_path, inputs)
    with torch.no_grad(), lora_triton.disable_adapters(model):
        base = run(model, inputs)
    assert max_diff(expected, base) > 1e-3
    assert max_diff(got, expected) <= TOL
    # And back into lora_triton from our own files.
    again = lora_triton.load_adapter(BUILDERS[kind](), str(tmp_path)).eval()
    with torch.no_grad():
        assert max_diff(run(again, inputs), expected) <= TOL


def test_peft_non_default_adapter_layout(tmp_path):
    kind, kwargs = CASES["mlp-bias-all-mts"]
    pm = _peft_model(kind, {"target_modules": ["up", "down"], "r": 4}, adapter_name="mine")
    _peft_save(pm, tmp_path)
    assert os.path.isfile(tmp_path / "mine" / "adapter_config.json")
    inputs = model_input(kind)
    with torch.no_grad():
        expected = run(pm, inputs)
        model = lora_triton.load_adapter(BUILDERS[kind](), str(tmp_path), adapter_name="mine").eval()
        assert lora_triton.active_adapters(model) == ["mine"]
        assert max_diff(run(model, inputs), expected) <= TOL


def test_two_peft_adapters_switch(tmp_path):
    """Two PEFT adapters loaded side by side; set_adapter picks which one computes."""
    kind = "llama"
    inputs = model_input(kind)
    expected = {}
    for i, name in enumerate(("a", "b")):
        pm = _peft_model(kind, {"target_modules": ["q_proj", "v_proj"], "r": 2 + i})
        randomize_lora(pm, seed=20 + i)
        _peft_save(pm, tmp_path / name)
        with torch.no_grad():
            expected[name] = run(pm, inputs)
    model = BUILDERS[kind]()
    lora_triton.load_adapter(model, str(tmp_path / "a"), adapter_name="a")
    lora_triton.load_adapter(model, str(tmp_path / "b"), adapter_name="b")
    for name in ("a", "b"):
        lora_triton.set_adapter(model, name)
        with torch.no_grad():
            assert max_diff(run(model, inputs), expected[name]) <= TOL


def test_is_trainable_load(tmp_path):
    pm = _peft_model("mlp", {"target_modules": ["up"], "r": 2})
    _peft_save(pm, tmp_path)
    frozen = lora_triton.load_adapter(BUILDERS["mlp"](), str(tmp_path))
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = lora_triton.load_adapter(BUILDERS["mlp"](), str(tmp_path), is_trainable=True)
    names = sorted(n for n, p in trainable.named_parameters() if p.requires_grad)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


# -- config round trip ------------------------------------------------------------------------------
def test_config_ours_to_peft(tmp_path):
    ours = lora_triton.LoraConfig(r=6, lora_alpha=12.5, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                  use_rslora=True, rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 4},
                                  bias="lora_only", layers_to_transform=[0, 2], layers_pattern="layers",
                                  modules_to_save=["lm_head"], lora_bias=True, exclude_modules=["x"],
                                  init_lora_weights=False)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                  "layers_to_transform", "lora_bias", "init_lora_weights", "use_dora"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    assert list(theirs.modules_to_save) == ["lm_head"]
    assert set(theirs.exclude_modules) == {"x"}
    assert theirs.layers_pattern in (["layers"], "layers")


def test_config_peft_to_ours(tmp_path):
    theirs = peft.LoraConfig(r=5, lora_alpha=20, target_modules=["a", "b"], use_rslora=True,
                             rank_pattern={"a": 2}, alpha_pattern={"b": 3.5}, bias="all", lora_bias=True,
                             layers_to_transform=1, modules_to_save=["head"], lora_dropout=0.1)
    theirs.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known (or knowingly ignored)
        ours = lora_triton.LoraConfig.from_pretrained(str(tmp_path))
    assert (ours.r, ours.lora_alpha, ours.use_rslora, ours.bias, ours.lora_bias) == (5, 20, True, "all", True)
    assert sorted(ours.target_modules) == ["a", "b"]
    assert ours.rank_pattern == {"a": 2} and ours.alpha_pattern == {"b": 3.5}
    assert ours.layers_to_transform == [1] and ours.modules_to_save == ["head"]
    assert ours.lora_dropout == pytest.approx(0.1)
    assert ours.scaling_for("x.a") == pytest.approx(20 / 2**0.5)
    assert ours.scaling_for("x.b") == pytest.approx(3.5 / 5**0.5)


def _write_config(tmp_path, **changes):
    peft.LoraConfig(r=2, target_modules=["up"]).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(tmp_path)


def test_config_unknown_key_warns(tmp_path):
    with pytest.warns(UserWarning, match="brand_new_field"):
        cfg = lora_triton.LoraConfig.from_pretrained(_write_config(tmp_path, brand_new_field=3))
    assert cfg.r == 2


@pytest.mark.parametrize("field, value", [("init_lora_weights", "pissa"),
                                          ("peft_type", "IA3"), ("use_qalora", True)])
def test_config_unsupported_values_raise(tmp_path, field, value):
    directory = _write_config(tmp_path, **{field: value})
    with pytest.raises((ValueError, NotImplementedError), match=field):
        lora_triton.LoraConfig.from_pretrained(directory)


def test_loaded_layers_are_lora_linear(tmp_path):
    pm = _peft_model("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "r": 2})
    _peft_save(pm, tmp_path)
    model = lora_triton.load_adapter(BUILDERS["gpt2"](), str(tmp_path))
    layers = lora_triton.nn.lora_layers(model)
    assert len(layers) == 2 and all(isinstance(m, LoraLinear) and m.fan_in_fan_out for _, m in layers)


def test_bf16_base_fp32_adapter_close_to_peft(tmp_path):
    pm = _peft_model("llama", {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4, "task_type": "CAUSAL_LM"})
    _peft_save(pm, tmp_path)
    inputs = model_input("llama")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lora_triton.load_adapter(BUILDERS["llama"](dtype=torch.bfloat16), str(tmp_path))
        layer = ours.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's default: fp32 adapters
        theirs = peft.PeftModel.from_pretrained(BUILDERS["llama"](dtype=torch.bfloat16), str(tmp_path))
        got, want, exact = run(ours, inputs).float(), run(theirs, inputs).float(), run(pm, inputs)
    assert max_diff(got, exact) <= 2e-2 * (exact.abs().max().item() + 1)
    assert max_diff(got, want) <= 2e-2 * (exact.abs().max().item() + 1)


def test_modules_to_save_suffix_rule_like_peft(tmp_path):
    """PEFT wraps every module whose path ends with the name (no dot boundary): "ead" wraps "head"."""
    pm = _peft_model("mlp", {"target_modules": ["up"], "modules_to_save": ["ead"], "r": 2})
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].bias.add_(1.0)
    _peft_save(pm, tmp_path)
    inputs = model_input("mlp")
    model = lora_triton.load_adapter(BUILDERS["mlp"](), str(tmp_path))
    assert isinstance(model.head, lora_triton.nn.ModulesToSaveWrapper)
    with torch.no_grad():
        assert max_diff(run(model, inputs), run(pm, inputs)) <= TOL
        with lora_triton.disable_adapters(model):  # the base head was not overwritten
            assert max_diff(run(model, inputs), run(BUILDERS["mlp"](), inputs)) <= TOL


def test_orthogonal_init_adapter_loads(tmp_path):
    """'orthogonal' only chose the starting values (base untouched): PEFT's adapter loads and matches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS["mlp"](), peft.LoraConfig(target_modules=["up", "down"], r=4,
                                                                    init_lora_weights="orthogonal"))
    randomize_lora(pm, seed=8)
    _peft_save(pm, tmp_path)
    inputs = model_input("mlp")
    model = lora_triton.load_adapter(BUILDERS["mlp"](), str(tmp_path))
    with torch.no_grad():
        assert max_diff(run(model, inputs), run(pm, inputs)) <= TOL
    # It can be saved again in PEFT's format, but a new adapter cannot be initialised that way.
    lora_triton.save_adapter(model, str(tmp_path / "again"))
    fresh = BUILDERS["mlp"]()
    with pytest.raises(NotImplementedError, match="init_lora_weights='orthogonal'"):
        lora_triton.inject_lora(fresh, lora_triton.LoraConfig(target_modules=["up"], init_lora_weights="orthogonal"))
    assert not lora_triton.nn.lora_layers(fresh)
