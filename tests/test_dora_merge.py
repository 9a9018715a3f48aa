"""DoRA merge paths: W' = (m / n)(W + s B A) in fp32 rounded once, equal to PEFT's merge (also after a
plain LoRA adapter, in one call or two), unmerge, safe_merge, merge_and_unload, disable after merge."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import BUILDERS, max_diff, model_input, run

import lora_triton
from lora_triton.nn import LoraLinear

TOL = 1e-5
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def _perturb_magnitudes(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.4 * (torch.rand(p.shape, generator=g) - 0.5))


def _peft_pair(tmp_path, kind="mlp", targets=("up", "down")):
    """PEFT model with a plain adapter "a" and a DoRA adapter "d"; the same two loaded here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(target_modules=list(targets), r=3,
                                                                   init_lora_weights=False), adapter_name="a")
        pm.add_adapter("d", peft.LoraConfig(target_modules=list(targets), r=2, lora_alpha=5, use_dora=True,
                                            init_lora_weights=False))
        _perturb_magnitudes(pm)
        pm.save_pretrained(str(tmp_path))
    model = BUILDERS[kind]()
    for name in ("a", "d"):
        lora_triton.load_adapter(model, str(tmp_path), adapter_name=name)
    return pm.eval(), model.eval()


def _base_weights(model, strip=""):
    return {n.removeprefix(strip): p.detach().clone() for n, p in model.named_parameters()
            if n.endswith("base_layer.weight")}


@pytest.mark.parametrize("order, calls", [(["d"], 1), (["a", "d"], 1), (["d", "a"], 1), (["a", "d"], 2)])
def test_merge_equals_peft_and_unmerge_restores(tmp_path, order, calls):
    pm, model = _peft_pair(tmp_path)
    inputs = model_input("mlp")
    lora_triton.set_adapter(model, order)
    pm.base_model.set_adapter(order)
    before = _base_weights(model)
    with torch.no_grad():
        unmerged_out = run(model, inputs) if order[0] == "d" else None
        if calls == 1:
            lora_triton.merge_adapter(model, order)
            pm.merge_adapter(order)
        else:
            for name in order:
                lora_triton.merge_adapter(model, [name])
                pm.merge_adapter([name])
        ours, theirs = _base_weights(model), _base_weights(pm, PREFIX)
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            assert max_diff(ours[key], theirs[key]) <= TOL, key
            assert max_diff(ours[key], before[key]) > 1e-4, key
        if unmerged_out is not None:  # DoRA first: the merged model computes what the adapters did
            assert max_diff(run(model, inputs), unmerged_out) <= TOL
        lora_triton.unmerge_adapter(model)
        for key, value in _base_weights(model).items():
            assert max_diff(value, before[key]) <= 1e-6, key


@pytest.mark.parametrize("kind, targets", [("gpt2", ("c_attn", "c_proj")), ("llama", ("q_proj", "down_proj"))])
def test_merge_and_unload_gives_plain_layers_with_the_same_logits(tmp_path, kind, targets):
    pm, model = _peft_pair(tmp_path, kind, targets)
    lora_triton.set_adapter(model, "d")
    inputs = model_input(kind)
    with torch.no_grad():
        expected = run(model, inputs)
        plain = lora_triton.merge_and_unload(model, safe_merge=True)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        assert max_diff(run(plain, inputs), expected) <= TOL


def test_safe_merge_refuses_non_finite_and_changes_nothing(tmp_path):
    _, model = _peft_pair(tmp_path)
    lora_triton.set_adapter(model, "d")
    layer = model.layers[1].down
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight[0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        lora_triton.merge_adapter(model, ["d"], safe_merge=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLinear))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_merge_rounds_once_and_unmerge_is_within_one_step(dtype):
    torch.manual_seed(4)
    base = torch.nn.Linear(40, 24).to(dtype)
    layer = LoraLinear(base, "d", r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    _perturb_magnitudes(layer)
    w0 = base.weight.detach().clone()
    a, b = layer.lora_A["d"].weight.double(), layer.lora_B["d"].weight.double()
    m = layer.lora_magnitude_vector["d"].weight.double()
    dense = w0.double() + 2.0 * b @ a
    exact = (m / dense.norm(dim=1))[:, None] * dense
    layer.merge(["d"])
    merged = base.weight.detach()
    # One rounding from (nearly) exact values: at most one ulp of the target dtype away.
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((merged.double() - exact).abs() <= ulp).all()
    x = torch.randn(5, 40).to(dtype)
    layer.unmerge()
    restored = base.weight.detach()
    step = torch.finfo(dtype).eps * (w0.double().abs() + exact.abs() / (m / dense.norm(dim=1))[:, None])
    assert ((restored.double() - w0.double()).abs() <= step).all()
    assert layer(x).isfinite().all()


def test_disable_after_merge_unmerges_and_computes_the_base(tmp_path):
    _, model = _peft_pair(tmp_path)
    lora_triton.set_adapter(model, "d")
    inputs = model_input("mlp")
    with torch.no_grad():
        base_out = None
        with lora_triton.disable_adapters(model):
            base_out = run(model, inputs)
        lora_triton.merge_adapter(model)
        with lora_triton.disable_adapters(model):
            assert max_diff(run(model, inputs), base_out) <= TOL
