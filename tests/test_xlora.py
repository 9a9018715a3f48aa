"""X-LoRA: logits and classifier gradients equal PEFT's where PEFT works; one fused call per layer; exact
save/load; names kept as given; clear errors."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import max_diff, model_input, randomize_lora, tiny_llama

import lora_triton
from lora_triton.nn import lora_layers

TOL = 1e-5
EXPERT_TARGETS = [["q_proj", "v_proj"], ["q_proj", "down_proj"], ["v_proj", "up_proj", "o_proj"]]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    """Three PEFT LoRA adapters (different targets and ranks, random non-zero B), saved by PEFT."""
    root = tmp_path_factory.mktemp("experts")
    dirs = []
    for i, targets in enumerate(EXPERT_TARGETS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=targets, r=2 + i, lora_alpha=4,
                                                                   init_lora_weights=False))
            randomize_lora(pm, seed=10 + i, scale=0.4)
            pm.save_pretrained(root / str(i))
        dirs.append(str(root / str(i)))
    return dirs


def _base():
    model = tiny_llama()
    model.config.use_cache = False
    return model


def _pair(expert_dirs, weighted_pass="auto", **kw):
    """PEFT's X-LoRA model and ours from the same experts, our classifier a copy of PEFT's."""
    kw = {"hidden_size": 64, "xlora_depth": 2, "xlora_size": 16, "xlora_dropout_p": 0.0, **kw}
    adapters = {str(i): d for i, d in enumerate(expert_dirs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_base(), peft.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, **kw))
    ours = lora_triton.XLoraModel(_base(), lora_triton.XLoraConfig(adapters=adapters, **kw), weighted_pass)
    theirs = {k.removeprefix("base_model.internal_xlora_classifier."): v for k, v in pm.state_dict().items()
              if "internal_xlora_classifier" in k}
    ours.internal_xlora_classifier.load_state_dict(theirs)
    return pm.eval(), ours.eval()


ROUTING = {
    "dense": {},
    "top2": {"top_k_lora": 2},
    "top2-softmax-topk": {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    "layerwise-depth1-temp": {"layerwise_scalings": True, "xlora_depth": 1, "softmax_temperature": 0.5},
    "pass-value-global-weight": {"scaling_pass_value": 0.3, "global_scaling_weight": 0.7},
}


@pytest.mark.parametrize("case, weighted_pass", [(c, "multi_lora") for c in sorted(ROUTING)] +
                         [("dense", "concat"), ("top2-softmax-topk", "concat")])
def test_logits_equal_peft(case, weighted_pass, expert_dirs):
    pm, ours = _pair(expert_dirs, weighted_pass, **ROUTING[case])
    inputs = model_input("llama")
    with torch.no_grad():
        expected, got = pm(**inputs).logits, ours(**inputs).logits
        plain = _base()(**inputs).logits
    assert max_diff(got, plain) > 1e-3
    assert max_diff(got, expected) <= TOL
    assert max_diff(ours.get_latest_scalings(), pm.get_latest_scalings()) <= 1e-6


def test_classifier_gradients_equal_peft(expert_dirs):
    pm, ours = _pair(expert_dirs, top_k_lora=2)
    inputs = model_input("llama")
    for model in (pm, ours):
        model.train()
        model(**inputs).logits.square().mean().backward()
    theirs = {k.removeprefix("base_model.internal_xlora_classifier."): p.grad for k, p in pm.named_parameters()
              if "internal_xlora_classifier" in k}
    mine = dict(ours.internal_xlora_classifier.named_parameters())
    assert theirs.keys() == mine.keys()
    for k, grad in theirs.items():
        assert mine[k].grad is not None and max_diff(mine[k].grad, grad) <= 1e-5 * max(1.0, grad.abs().max())
    assert not any(p.requires_grad for n, p in ours.model.named_parameters() if "lora_" in n)


def test_weighting_u_equals_peft_input_scaling_fp64(expert_dirs):
    # Both our paths weight U = x A^T per token; PEFT scales x. Same function: checked in fp64 on one layer.
    # The differentiable path keeps fp64 throughout (1e-12); multi_lora_linear takes its per-slot weights
    # and scalings in fp32, which bounds the fused path at fp32 rounding of those (1e-6 relative).
    ours = lora_triton.XLoraModel(_base().double(), lora_triton.XLoraConfig(
        hidden_size=64, adapters={f"e{i}": d for i, d in enumerate(expert_dirs)}, top_k_lora=2), "multi_lora")
    layer_index, layer = next((i, m) for i, m in enumerate(ours._layers) if len(ours._stacks[i].names) >= 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, layer.in_features, generator=g, dtype=torch.float64)
    c = torch.softmax(torch.randn(2, 5, len(ours._layers), 3, generator=g, dtype=torch.float64), -1)
    ci = c[:, :, layer_index, :]
    keep = torch.zeros_like(ci).scatter(-1, ci.topk(2, dim=-1).indices, 1.0)
    with torch.no_grad():
        want = layer.base_layer(x)
        for i, name in enumerate(ours.config.expert_names):
            if name in layer.lora_A:
                xi = x * (ci * keep)[..., i:i + 1]
                want = want + layer.lora_B[name](layer.lora_A[name](xi)) * layer.scaling[name]
        ours._scalings = c
        fused = layer(x)
    ours._scalings = c.clone().requires_grad_(True)
    differentiable = layer(x)
    assert differentiable.requires_grad
    assert (differentiable - want).abs().max() <= 1e-12 * want.abs().max()
    assert (fused - want).abs().max() <= 1e-6 * want.abs().max()


def test_one_multi_lora_call_per_layer_with_k_slots(expert_dirs, monkeypatch):
    ours = lora_triton.XLoraModel(_base(), lora_triton.XLoraConfig(
        hidden_size=64, adapters={f"e{i}": d for i, d in enumerate(expert_dirs)}, top_k_lora=2,
        scaling_pass_value=0.5), weighted_pass="multi_lora")
    import lora_triton.nn.xlora as xlora_module

    calls = []
    real = xlora_module.multi_lora_linear

    def spy(*args, **kwargs):
        calls.append(tuple(args[6].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(xlora_module, "multi_lora_linear", spy)
    with torch.no_grad():
        ours(**model_input("llama", batch=2, seq=3))
    assert len(calls) == 2 * len(ours._layers)  # scaling pass + weighted pass, one call per layer each
    assert all(shape == (6, 2) for shape in calls)  # 6 tokens, top_k_lora = 2 < 3 slots


def test_names_kept_and_save_load_round_trip(expert_dirs, tmp_path):
    names = {"math": expert_dirs[0], "code": expert_dirs[1], "chat": expert_dirs[2]}
    config = lora_triton.XLoraConfig(hidden_size=64, adapters=names, xlora_depth=2, xlora_size=8)
    ours = lora_triton.XLoraModel(_base(), config).eval()
    torch.manual_seed(4)
    with torch.no_grad():
        for p in ours.internal_xlora_classifier.parameters():
            p.normal_()
    inputs = model_input("llama")
    with torch.no_grad():
        expected = ours(**inputs).logits
    assert sorted(lora_triton.nn.adapter_configs(ours.model)) == sorted(names)
    lora_triton.save_xlora(ours, str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat", "code", "math"]
    (tmp_path / "saved").rename(tmp_path / "moved")  # the folder is relocatable: experts read from <dir>/<name>
    again = lora_triton.load_xlora(_base(), str(tmp_path / "moved")).eval()
    assert again.config.expert_names == ["math", "code", "chat"]
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, expected)


def test_our_save_loads_in_peft(expert_dirs, tmp_path):
    pm, ours = _pair(expert_dirs)
    with torch.no_grad():
        for p in ours.internal_xlora_classifier.parameters():
            p.normal_()
        expected = ours(**model_input("llama")).logits
    lora_triton.save_xlora(ours, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_base(), str(tmp_path)).eval()
    with torch.no_grad():
        assert max_diff(loaded(**model_input("llama")).logits, expected) <= TOL


def test_trainable_experts_get_gradients_and_unload(expert_dirs):
    ours = lora_triton.XLoraModel(_base(), lora_triton.XLoraConfig(
        hidden_size=64, adapters={"a": expert_dirs[0], "b": expert_dirs[2]}, use_trainable_adapters=True))
    ours.train()
    ours(**model_input("llama")).logits.square().mean().backward()
    grads = [p.grad for n, p in ours.model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    plain = ours.unload()
    assert not lora_layers(plain) or all(not m.lora_A for _, m in lora_layers(plain))


@pytest.mark.parametrize("bad, match", [
    ({"hidden_size": None}, "hidden_size"), ({"adapters": {}}, "adapters"), ({"top_k_lora": 4}, "top_k_lora"),
    ({"enable_softmax_topk": True}, "needs top_k_lora"), ({"xlora_depth": 0}, "xlora_depth"),
    ({"adapters": {"a.b": "x"}}, "without '.'"), ({"peft_type": "LORA"}, "XLORA")])
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_triton.XLoraConfig(**{"hidden_size": 64, "adapters": {"a": "x", "b": "y", "c": "z"}, **bad})


def test_failed_expert_load_leaves_the_model(expert_dirs, tmp_path):
    # The second expert was trained on another architecture: its load fails after the first one loaded.
    from models import tiny_gpt2

    other = lora_triton.inject_lora(tiny_gpt2(), lora_triton.LoraConfig(target_modules=["c_attn"], r=2))
    lora_triton.save_adapter(other, str(tmp_path / "gpt2"))
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        lora_triton.XLoraModel(model, lora_triton.XLoraConfig(
            hidden_size=64, adapters={"a": expert_dirs[0], "b": str(tmp_path / "gpt2")}))
    assert not lora_triton.nn.adapter_configs(model) and not lora_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_pre_hooks


def test_lora_bias_experts_equal_peft(tmp_path):
    # PEFT adds each expert's s * g * lora_B.bias whatever the routing weight; so do we.
    dirs = {}
    for i in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2,
                                                                   lora_bias=True, init_lora_weights=False))
            randomize_lora(pm, seed=30 + i, scale=0.4)
            pm.save_pretrained(tmp_path / str(i))
        dirs[str(i)] = str(tmp_path / str(i))
    kw = {"hidden_size": 64, "adapters": dirs, "global_scaling_weight": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_base(), peft.XLoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    ours = lora_triton.XLoraModel(_base(), lora_triton.XLoraConfig(**kw)).eval()
    ours.internal_xlora_classifier.load_state_dict(
        {k.removeprefix("base_model.internal_xlora_classifier."): v for k, v in pm.state_dict().items()
         if "internal_xlora_classifier" in k})
    inputs = model_input("llama")
    with torch.no_grad():
        assert max_diff(ours(**inputs).logits, pm(**inputs).logits) <= TOL


@pytest.mark.parametrize("routing", [{}, {"top_k_lora": 2}], ids=["dense", "top2"])
def test_triton_weighted_pass_under_the_interpreter_equals_peft(routing, expert_dirs, monkeypatch):
    # The fused Triton path (one multi_lora_linear kernel launch per layer) on CPU through Triton's
    # interpreter (TRITON_INTERPRET=1, tests/conftest.py); tiny shapes: one sequence of 5 tokens.
    kernels = pytest.importorskip("lora_triton.kernels.multi_lora", reason="needs triton")
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    calls = []
    launch = kernels.multi_lora_linear
    monkeypatch.setattr(kernels, "multi_lora_linear", lambda *a, **k: calls.append(1) or launch(*a, **k))
    pm, ours = _pair(expert_dirs, "multi_lora", scaling_pass_value=0.0, **routing)
    inputs = {"input_ids": model_input("llama", batch=1, seq=5)["input_ids"]}
    with torch.no_grad():
        got = ours(**inputs).logits
        want = pm(**inputs).logits
    layers = [layer for _, layer in lora_layers(ours.model) if any(n in layer.lora_A for n in ("0", "1", "2"))]
    assert len(calls) == len(layers), "one kernel call per layer in the weighted pass (the scaling pass at 0 skips)"
    assert max_diff(got, want) <= 1e-4
