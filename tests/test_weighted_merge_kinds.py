"""add_weighted_adapter on Conv1d/2d/3d and Embedding LoRA: equal to PEFT where PEFT is right (Conv2d, Embedding),
exact or correct where it fails (Conv1d / Conv3d SVD, PEFT #3769; grouped convs), clear errors otherwise."""

from __future__ import annotations

import warnings

import pytest
import torch
from kinds_models import call, conv_inputs, conv_net, max_diff
from peft.utils import merge_utils

import lora_triton as lt
from lora_triton.nn import adapter_layers
from lora_triton.nn.kinds import holds_adapter

peft = pytest.importorskip("peft", reason="PEFT is the oracle for weighted merging")

WEIGHTS = [0.7, -0.4]
# Per-layer adapter inputs for the layers of kinds_models.ConvNet.
SHAPES = {"c1": (2, 8, 7), "c2": (2, 3, 9, 8), "c3": (2, 10, 3, 5, 4), "proj": (2, 12)}


def _layer_input(path: str, g: torch.Generator, dtype) -> torch.Tensor:
    if path == "emb":
        return torch.randint(0, 23, (2, 9), generator=g)
    return torch.randn(SHAPES[path], generator=g).to(dtype)


def _out(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution alone (its forward with the base subtracted), in the layer's dtype."""
    active = layer.active_adapters
    try:
        layer.active_adapters = [name]
        with torch.no_grad():
            with_adapter = layer(x)
            layer.active_adapters = []
            base = layer(x)
    finally:
        layer.active_adapters = active
    return with_adapter - base


def _pair(kw_a: dict, kw_b: dict, tmp_path, groups: int = 1):
    """PEFT's ConvNet with adapters "a" / "b" (random factors) and ours loaded from PEFT's files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(conv_net(groups=groups), peft.LoraConfig(init_lora_weights=False, **kw_a),
                                 adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **kw_b))
        pm.save_pretrained(str(tmp_path))
    ours = conv_net(groups=groups)
    for name in ("a", "b"):
        lt.load_adapter(ours, str(tmp_path), adapter_name=name)
    return pm.eval(), ours.eval()


def _ours(kw_a: dict, kw_b: dict, groups: int = 1, dtype=torch.float64):
    net = conv_net(groups=groups).to(dtype)
    lt.inject_lora(net, lt.LoraConfig(init_lora_weights=False, **kw_a), "a")
    lt.inject_lora(net, lt.LoraConfig(init_lora_weights=False, **kw_b), "b")
    return net.eval()


def _logits(model, name: str):
    with torch.no_grad():
        if isinstance(model, peft.PeftModel):
            model.set_adapter(name)
        else:
            lt.set_adapter(model, name)
        return call(model, conv_inputs())


KW_A = dict(target_modules=["emb", "c2", "proj"], r=2, lora_alpha=4)
KW_B = dict(target_modules=["emb", "c2"], r=3, lora_alpha=5, rank_pattern={"emb": 2})


@pytest.mark.parametrize("combination_type, density", [
    ("cat", None), ("svd", None), ("ties_svd", 0.5), ("dare_linear_svd", 0.6), ("magnitude_prune_svd", 0.4)])
def test_conv2d_and_embedding_equal_peft(combination_type, density, tmp_path):
    pm, ours = _pair(KW_A, KW_B, tmp_path)
    kwargs = dict(combination_type=combination_type, density=density)
    torch.manual_seed(0)  # DARE: PEFT's order and layout of random draws is kept
    pm.add_weighted_adapter(["a", "b"], WEIGHTS, "m", **kwargs)
    torch.manual_seed(0)
    lt.add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "m", **kwargs)
    got = _logits(ours, "m")
    assert max_diff(got, _logits(ours, "a")) > 1e-3
    assert max_diff(got, _logits(pm, "m")) <= 1e-5


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_factorwise_names_equal_peft_on_every_conv_and_embedding(method, tmp_path):
    kw = dict(target_modules=["emb", "c1", "c2", "c3"], r=2)
    pm, ours = _pair(kw, {**kw, "lora_alpha": 5}, tmp_path)
    density = None if method == "linear" else 0.5
    pm.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type=method, density=density)
    lt.add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "m", combination_type=f"{method}_factorwise", density=density)
    assert max_diff(_logits(ours, "m"), _logits(pm, "m")) <= 1e-5


ALL = ["emb", "c1", "c2", "c3", "proj"]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd", "dare_linear_svd"])
def test_exact_types_give_the_weighted_sum_on_every_layer_type(combination_type, groups):
    # svd at a rank that holds the whole sum is exact too: on Conv1d / Conv3d (PEFT's SVD fails there,
    # #3769) and per group on a grouped Conv1d (c1 with groups=2). DARE at density 1 drops nothing.
    net = _ours(dict(target_modules=ALL, r=2, lora_alpha=3), dict(target_modules=["emb", "c1", "c3"], r=4,
                                                                  lora_alpha=2, use_rslora=True), groups=groups)
    density = 1.0 if combination_type.startswith("dare") else None
    lt.add_weighted_adapter(net, ["a", "b"], WEIGHTS, "m", combination_type=combination_type, svd_rank=6,
                            density=density)
    g = torch.Generator().manual_seed(5)
    layers = dict(adapter_layers(net))
    assert sorted(layers) == sorted(ALL)
    for path, layer in layers.items():
        x = _layer_input(path, g, torch.float64)
        want = sum(w * _out(layer, n, x) for n, w in zip(("a", "b"), WEIGHTS) if holds_adapter(layer, n))
        got = _out(layer, "m", x)
        assert layer.scaling["m"] == 1.0
        assert max_diff(got, want) <= 1e-10 * (1 + want.abs().max().item()), path


def test_bias_sources_combine_on_convs():
    net = _ours(dict(target_modules=["c2", "c3"], r=2, lora_bias=True), dict(target_modules=["c2"], r=3))
    lt.add_weighted_adapter(net, ["a", "b"], WEIGHTS, "m", combination_type="cat")
    g = torch.Generator().manual_seed(2)
    for path in ("c2", "c3"):
        layer, x = net.get_submodule(path), _layer_input(path, g, torch.float64)
        want = sum(w * _out(layer, n, x) for n, w in zip(("a", "b"), WEIGHTS) if holds_adapter(layer, n))
        assert layer.lora_B["m"].bias is not None
        assert max_diff(_out(layer, "m", x), want) <= 1e-12


@pytest.mark.parametrize("method, density", [("ties", 0.5), ("magnitude_prune", 0.3)])
def test_pruned_types_on_conv_and_embedding_deltas(method, density):
    # Oracle: PEFT's merge_utils on the dense deltas in PEFT's layout (get_delta_weight).
    net = _ours(dict(target_modules=["emb", "c1", "c3"], r=2), dict(target_modules=["emb", "c1", "c3"], r=3,
                                                                    lora_alpha=6), dtype=torch.float32)
    lt.add_weighted_adapter(net, ["a", "b"], WEIGHTS, "m", combination_type=method, density=density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in ("emb", "c1", "c3"):
            layer = net.get_submodule(path)
            deltas = [layer.delta_weight(n) for n in ("a", "b")]
            w = torch.tensor(WEIGHTS)
            want = merge_utils.magnitude_prune(deltas, w, density) if method == "magnitude_prune" else \
                merge_utils.ties(deltas, w, density, "total")
            assert max_diff(layer.delta_weight("m"), want) <= 1e-6, path


def test_peft_svd_fails_on_conv1d_and_conv3d_and_ours_is_right(tmp_path):
    kw = dict(target_modules=["c1", "c3"], r=2)
    pm, ours = _pair(kw, {**kw, "lora_alpha": 5}, tmp_path)
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="svd")
    lt.add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "m", combination_type="svd", svd_rank=4)
    for path in ("c1", "c3"):
        layer = ours.get_submodule(path)
        want = WEIGHTS[0] * layer.delta_weight("a") + WEIGHTS[1] * layer.delta_weight("b")
        assert layer.r["m"] == 4 and max_diff(layer.delta_weight("m"), want) <= 1e-5


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_merged_conv_and_embedding_adapter_saves_and_loads_in_peft(combination_type, tmp_path):
    _, ours = _pair(dict(target_modules=["emb", "c1", "c2", "c3"], r=2), dict(target_modules=["emb", "c2"], r=3),
                    tmp_path / "src")
    lt.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "m", combination_type=combination_type)
    want = _logits(ours, "m")
    lt.save_adapter(ours, str(tmp_path / "m"), adapter_name="m")
    again = lt.load_adapter(conv_net(groups=1), str(tmp_path / "m")).eval()
    assert max_diff(_logits(again, "default"), want) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(conv_net(groups=1), str(tmp_path / "m")).eval()
    assert max_diff(call(pm, conv_inputs()), want) <= 1e-5


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("case", ["grouped svd rank", "loha source"])
def test_bad_inputs_on_conv_layers_leave_the_model(case):
    net = _ours(dict(target_modules=["c1", "c2"], r=2), dict(target_modules=["c1"], r=4), groups=2)
    if case == "loha source":
        lt.inject_lora(net, lt.LoHaConfig(target_modules=["proj"], r=2), "h")
        kwargs, exc, match = dict(adapters=["a", "h"]), TypeError, "LoRA adapters only"
    else:
        kwargs, exc, match = dict(svd_rank=3), ValueError, "divisible by its groups"
    before, configs = _state(net), dict(lt.nn.adapter_configs(net))
    with pytest.raises(exc, match=match):
        lt.add_weighted_adapter(net, **{**dict(adapters=["a", "b"], weights=WEIGHTS, adapter_name="m",
                                               combination_type="svd"), **kwargs})
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert lt.nn.adapter_configs(net) == configs


def test_dora_sources_on_conv_and_embedding_contribute_their_whole_change():
    # A DoRA adapter at weight 1 reproduces itself (PEFT drops the magnitudes); mixed with a LoRA adapter,
    # `linear` gives the weighted sum of both changes. fp64; groups=1 (DoRA refuses grouped convs).
    net = _ours(dict(target_modules=["emb", "c1", "c2", "c3"], r=2, use_dora=True),
                dict(target_modules=["emb", "c2"], r=3), groups=1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.3)
    lt.add_weighted_adapter(net, ["a"], [1.0], "same", combination_type="cat")
    lt.add_weighted_adapter(net, ["a", "b"], WEIGHTS, "mix", combination_type="linear")
    g = torch.Generator().manual_seed(4)
    for path in ("emb", "c1", "c2", "c3"):
        layer, x = net.get_submodule(path), _layer_input(path, g, torch.float64)
        itself = _out(layer, "a", x)
        # DoRA's forward takes its norm in fp32 (nn/dora_layers.py): relative 1e-6 on an fp64 model
        assert max_diff(_out(layer, "same", x), itself) <= 1e-6 * (1 + itself.abs().max().item()), path
        want = sum(w * _out(layer, n, x) for n, w in zip(("a", "b"), WEIGHTS) if holds_adapter(layer, n))
        assert max_diff(_out(layer, "mix", x), want) <= 1e-6 * (1 + want.abs().max().item()), path
    with pytest.raises(ValueError, match="DoRA"):
        lt.add_weighted_adapter(net, ["a"], [1.0], "fw", combination_type="linear_factorwise")
