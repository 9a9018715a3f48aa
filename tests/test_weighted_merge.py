"""add_weighted_adapter: equal to PEFT where PEFT is right, exact where PEFT is not, clear errors otherwise."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import BUILDERS, max_diff, model_input, randomize_lora, run
from peft.utils import merge_utils

import lora_triton
from lora_triton.nn import lora_layers
from lora_triton.nn.weighted_merge import combine

TOL = 1e-5


def _pair(kind, kw_a, kw_b, tmp_path, dtype=torch.float32):
    """A PEFT model with adapters "a" and "b" (random, non-zero B), and ours loaded from PEFT's files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS[kind](dtype=dtype), peft.LoraConfig(init_lora_weights=False, **kw_a),
                                 adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **kw_b))
        randomize_lora(pm, scale=0.3)
        pm.save_pretrained(tmp_path)
    ours = BUILDERS[kind](dtype=dtype)
    for name in ("a", "b"):
        lora_triton.load_adapter(ours, str(tmp_path), adapter_name=name)
    return pm.eval(), ours.eval()


def _logits(model, name, kind):
    with torch.no_grad():
        if isinstance(model, peft.PeftModel):
            model.set_adapter(name)
        else:
            lora_triton.set_adapter(model, name)
        return run(model, model_input(kind))


def _delta(layer, name):
    a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return b @ a * layer.scaling[name]


LLAMA_A = dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8)
LLAMA_B = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=3,
               rank_pattern={"v_proj": 3})
GPT2_A = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=3)
GPT2_B = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=3, lora_alpha=5)


PEFT_RIGHT = [("llama", "cat", None), ("llama", "svd", None), ("llama", "ties_svd", 0.5),
              ("llama", "magnitude_prune_svd", 0.3), ("llama", "dare_linear_svd", 0.6), ("llama", "dare_ties_svd", 0.6),
              ("gpt2", "cat", None), ("gpt2", "svd", None), ("gpt2", "dare_ties_svd", 0.6)]


@pytest.mark.parametrize("kind, combination_type, density", PEFT_RIGHT)
def test_equal_to_peft_where_peft_is_right(kind, combination_type, density, tmp_path):
    kw_a, kw_b = (LLAMA_A, LLAMA_B) if kind == "llama" else (GPT2_A, GPT2_B)
    pm, ours = _pair(kind, kw_a, kw_b, tmp_path)
    kwargs = dict(combination_type=combination_type, density=density, svd_rank=5 if kind == "gpt2" else None)
    torch.manual_seed(0)  # DARE draws its masks from torch's generator: PEFT's order of draws is kept
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "m", **kwargs)
    torch.manual_seed(0)
    lora_triton.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "m", **kwargs)
    expected, got = _logits(pm, "m", kind), _logits(ours, "m", kind)
    assert max_diff(got, _logits(ours, "a", kind)) > 1e-3
    assert max_diff(got, expected) <= TOL


def test_linear_is_exact_where_peft_has_cross_terms(tmp_path):
    pm, ours = _pair("mlp", dict(target_modules=["up", "down"], r=3), dict(target_modules=["up", "down"], r=3,
                                                                         lora_alpha=6), tmp_path, torch.float64)
    lora_triton.add_weighted_adapter(ours, ["a", "b"], [1.0, -1.0], "m", combination_type="linear")
    pm.add_weighted_adapter(["a", "b"], [1.0, -1.0], "m", combination_type="linear")
    peft_layers = dict(pm.base_model.model.named_modules())
    for path, layer in lora_layers(ours):
        want = _delta(layer, "a") - _delta(layer, "b")
        assert layer.r["m"] == 6 and layer.scaling["m"] == 1.0
        assert (_delta(layer, "m") - want).abs().max() <= 1e-12 * want.abs().max()
        theirs = peft_layers[path].get_delta_weight("m").double()
        assert (theirs - want).norm() / want.norm() > 0.5, "PEFT's factor-wise linear has cross terms"


@pytest.mark.parametrize("method, density", [("ties", 0.4), ("magnitude_prune", 0.3), ("ties", 1.0)])
def test_pruned_types_act_on_the_deltas_exactly(method, density, tmp_path):
    # Oracle: PEFT's own merge functions applied to the dense deltas (the way its *_svd forms use them).
    _, ours = _pair("llama", LLAMA_A, LLAMA_B, tmp_path)
    weights = [0.6, 0.9]
    lora_triton.add_weighted_adapter(ours, ["a", "b"], weights, "m", combination_type=method, density=density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at density 1
        for _path, layer in lora_layers(ours):
            held = [n for n in ("a", "b") if n in layer.lora_A]
            deltas = [_delta(layer, n).float() for n in held]
            w = torch.tensor([weights[("a", "b").index(n)] for n in held])
            want = merge_utils.magnitude_prune(deltas, w, density) if method == "magnitude_prune" else \
                merge_utils.ties(deltas, w, density, "total")
            assert layer.r["m"] == min(layer.in_features, layer.out_features)
            assert max_diff(_delta(layer, "m"), want) <= 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales_delta_entries(method, tmp_path):
    # One source: every entry of the new delta is 0 or w * dW / density, and about `density` of them survive.
    _, ours = _pair("llama", LLAMA_A, LLAMA_B, tmp_path)
    lora_triton.add_weighted_adapter(ours, ["a"], [0.7], "m", combination_type=method, density=0.5)
    kept, total = 0, 0
    for _path, layer in lora_layers(ours):
        if "a" not in layer.lora_A:
            continue
        full, got = 0.7 * _delta(layer, "a") / 0.5, _delta(layer, "m")
        alive = got != 0
        assert torch.allclose(got[alive], full[alive], rtol=1e-5, atol=1e-7)
        kept, total = kept + int(alive.sum()), total + got.numel()
    assert 0.45 < kept / total < 0.55


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factorwise_names_reproduce_peft(method, tmp_path):
    kw = dict(target_modules=["up", "down"], r=3)
    pm, ours = _pair("mlp", kw, {**kw, "lora_alpha": 5}, tmp_path)
    density = None if method == "linear" else 0.5
    torch.manual_seed(1)
    pm.add_weighted_adapter(["a", "b"], [0.8, -0.5], "m", combination_type=method, density=density)
    torch.manual_seed(1)
    lora_triton.add_weighted_adapter(ours, ["a", "b"], [0.8, -0.5], "m", combination_type=f"{method}_factorwise",
                                     density=density)
    assert max_diff(_logits(ours, "m", "mlp"), _logits(pm, "m", "mlp")) <= TOL


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd", "ties"])
@pytest.mark.parametrize("kind, kw", [("llama", dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=4,
                                                     use_rslora=True)),
                                      ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=2,
                                                    lora_bias=True))], ids=["rslora", "lora_bias"])
def test_single_adapter_at_weight_one_reproduces_itself(kind, kw, combination_type, tmp_path):
    pm, ours = _pair(kind, kw, kw, tmp_path)
    density = 1.0 if combination_type == "ties" else None
    lora_triton.add_weighted_adapter(ours, ["a"], [1.0], "m", combination_type=combination_type, density=density)
    assert max_diff(_logits(ours, "m", kind), _logits(ours, "a", kind)) <= TOL
    pm.add_weighted_adapter(["a"], [1.0], "m", combination_type="cat")
    assert max_diff(_logits(pm, "m", kind), _logits(pm, "a", kind)) > 1e-3, "PEFT gets this wrong (#3761)"


@pytest.mark.parametrize("combination_type, density", [("cat", None), ("ties", 0.5), ("svd", None)])
def test_saved_merge_loads_here_and_in_peft(combination_type, density, tmp_path):
    _, ours = _pair("llama", LLAMA_A, LLAMA_B, tmp_path / "src")
    lora_triton.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "m", combination_type=combination_type,
                                     density=density)
    expected = _logits(ours, "m", "llama")
    lora_triton.save_adapter(ours, str(tmp_path / "m"), adapter_name="m")
    again = lora_triton.load_adapter(BUILDERS["llama"](), str(tmp_path / "m")).eval()
    assert max_diff(run(again, model_input("llama")), expected) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(BUILDERS["llama"](), str(tmp_path / "m")).eval()
    assert max_diff(_logits(pm, "default", "llama"), expected) <= TOL


BAD = {
    "unknown adapter": (dict(adapters=["a", "zz"]), KeyError, "unknown adapters"),
    "weights length": (dict(weights=[1.0]), ValueError, "weights must be a list of 2"),
    "density zero": (dict(combination_type="ties", density=0.0), ValueError, r"density in \(0, 1\]"),
    "density above one": (dict(combination_type="dare_linear_svd", density=1.5), ValueError, "density"),
    "density missing": (dict(combination_type="magnitude_prune"), ValueError, "density"),
    "unknown type": (dict(combination_type="mean"), ValueError, "combination_type must be one of"),
    "existing name": (dict(adapter_name="b"), ValueError, "already exists"),
    "duplicate": (dict(adapters=["a", "a"]), ValueError, "distinct"),
    "sign method": (dict(combination_type="ties", density=0.5, majority_sign_method="vote"), ValueError,
                    "majority_sign_method"),
    "factorwise ranks": (dict(combination_type="linear_factorwise"), ValueError, "equal ranks"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_clear_errors_and_leave_the_model(case, tmp_path):
    _, ours = _pair("llama", LLAMA_A, LLAMA_B, tmp_path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    configs = dict(lora_triton.nn.adapter_configs(ours))
    changes, exc, match = BAD[case]
    kwargs = {**dict(adapters=["a", "b"], weights=[0.5, 0.5], adapter_name="m"), **changes}
    with pytest.raises(exc, match=match):
        lora_triton.add_weighted_adapter(ours, **kwargs)
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert lora_triton.nn.adapter_configs(ours) == configs


def test_combine_matches_peft_merge_utils_with_frequency_sign():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(5, 7, generator=g) for _ in range(3)]
    w = [0.3, -1.2, 0.8]
    got = combine("ties", tensors, w, 0.6, "frequency")
    want = merge_utils.ties(tensors, torch.tensor(w), 0.6, "frequency")
    assert torch.equal(got, want)


def test_dora_sources_combine_exactly(tmp_path):
    # A DoRA adapter's whole change (m / ||W + sBA||)(W + sBA) - W enters the combination (PEFT drops m).
    model = tiny_mlp_double()
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up", "down"], r=2, use_dora=True), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"], r=3), "b")
    randomize_lora(model, scale=0.3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.add_(1.0)
    model.eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    lora_triton.add_weighted_adapter(model, ["a"], [1.0], "same", combination_type="cat")
    with torch.no_grad():
        lora_triton.set_adapter(model, "a")
        expected = model(x)
        lora_triton.set_adapter(model, "same")
        assert max_diff(model(x), expected) <= 1e-6  # DoRA's forward takes its row norm in fp32
    lora_triton.add_weighted_adapter(model, ["a", "b"], [0.6, -0.4], "mix", combination_type="linear")
    for _path, layer in lora_layers(model):
        w = layer.base_weight().double()
        d = _delta(layer, "a")
        m = layer.lora_magnitude_vector["a"].weight.double().reshape(-1, 1)
        want = 0.6 * ((m / (w + d).norm(dim=1, keepdim=True)) * (w + d) - w)
        if "b" in layer.lora_A:
            want = want - 0.4 * _delta(layer, "b")
        assert (_delta(layer, "mix") - want).abs().max() <= 1e-10 * want.abs().max()
    with pytest.raises(ValueError, match="DoRA"):
        lora_triton.add_weighted_adapter(model, ["a"], [1.0], "fw", combination_type="linear_factorwise")


def tiny_mlp_double():
    return BUILDERS["mlp"](dtype=torch.float64)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_pool_merge_equals_the_model_merge(combination_type, tmp_path):
    # The pool's CPU copies give the same new adapter as add_weighted_adapter on a model.
    from lora_triton.serving.pool_merge import merge_pool_adapters

    kw = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    _, ours = _pair("llama", kw, {**kw, "r": 3}, tmp_path)
    pool = lora_triton.AdapterPool(BUILDERS["llama"](), num_slots=3, max_rank=8, target_modules=["q_proj", "v_proj"])
    for name in ("a", "b"):
        pool.load(name, str(tmp_path / name))
    merge_pool_adapters(pool, ["a", "b"], [0.7, -0.3], "m", combination_type=combination_type)
    lora_triton.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.3], "m", combination_type=combination_type)
    ids = model_input("llama")["input_ids"]
    with torch.no_grad(), pool.batch(["m", "m"]):
        got = pool.model(input_ids=ids).logits
    assert max_diff(got, _logits(ours, "m", "llama")) <= TOL
    with pytest.raises(ValueError, match="full rank"):
        merge_pool_adapters(pool, ["a", "b"], [1.0, 1.0], "t", combination_type="ties", density=0.5)
