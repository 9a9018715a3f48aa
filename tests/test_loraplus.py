"""LoRA+: the same optimizer parameter groups (members, lr, weight decay, order) as PEFT's function."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import BUILDERS
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer

import lora_triton
from lora_triton.nn.loraplus import loraplus_param_groups

PEFT_PREFIX = "base_model.model."
HYPER = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=3e-5, loraplus_weight_decay=0.01)

CASES = {
    "llama-all-linear": ("llama", dict(target_modules="all-linear", r=4)),
    "gpt2-bias-all": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all", r=2)),
    "mlp-lora-bias-mts-norm": ("mlp", dict(target_modules=["up", "down"], lora_bias=True, bias="lora_only",
                                           modules_to_save=["norm", "head"], r=3)),
}


def _groups_by_name(optimizer, model):
    names = {id(p): n.removeprefix(PEFT_PREFIX) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def _peft_model(kind, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_groups_as_peft(case):
    kind, kwargs = CASES[case]
    ours = lora_triton.inject_lora(BUILDERS[kind](), lora_triton.LoraConfig(**kwargs))
    pm = _peft_model(kind, kwargs)
    got = _groups_by_name(lora_triton.create_loraplus_optimizer(ours, torch.optim.AdamW, **HYPER), ours)
    expected = _groups_by_name(peft_create_loraplus_optimizer(pm, torch.optim.AdamW, **HYPER), pm)
    assert got == expected
    assert all(names for names, _, _ in got[2:3]), "B factors land in the lr * ratio group"
    assert got[0][1] == HYPER["lr"] and got[2][1] == HYPER["lr"] * HYPER["loraplus_lr_ratio"]


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(target_modules=["embed_tokens", "q_proj"])],
                         ids=["dora-magnitudes", "lora-embedding"])
def test_name_patterns_match_peft_on_its_own_layer_kinds(extra):
    # DoRA magnitudes and LoRA embedding factors are grouped by parameter name: run our grouping on
    # PEFT's own model (which has those layers) and compare with PEFT's function on it.
    kwargs = {"target_modules": ["q_proj", "v_proj"], "r": 4, **extra}
    pm = _peft_model("llama", kwargs)
    ours = loraplus_param_groups(pm, **HYPER)
    expected = _groups_by_name(peft_create_loraplus_optimizer(pm, torch.optim.SGD, **HYPER), pm)
    got = [(sorted(n.removeprefix(PEFT_PREFIX) for n in g["names"]), g["lr"], g["weight_decay"]) for g in ours]
    assert got == expected
    special = "lora_magnitude_vector" if "use_dora" in extra else "lora_embedding_A"
    assert any(special in n for names, _, _ in got for n in names)


def test_optimizer_kwargs_pass_through_and_step_runs():
    config = lora_triton.LoraConfig(target_modules=["up"], r=2, init_lora_weights=False)  # B != 0: A gets a grad
    model = lora_triton.inject_lora(BUILDERS["mlp"](), config)
    opt = lora_triton.create_loraplus_optimizer(model, torch.optim.Adam, lr=1e-2, loraplus_lr_ratio=4,
                                                betas=(0.5, 0.6))
    assert all(g["betas"] == (0.5, 0.6) for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    model(torch.randn(3, 16)).square().sum().backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(loraplus_lr_ratio="4"), dict(loraplus_lr_embedding=None)])
def test_bad_hyperparameters_are_clear_errors(bad):
    model = lora_triton.inject_lora(BUILDERS["mlp"](), lora_triton.LoraConfig(target_modules=["up"], r=2))
    kwargs = {**dict(lr=1e-3, loraplus_lr_ratio=4.0), **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        lora_triton.create_loraplus_optimizer(model, torch.optim.SGD, **kwargs)


def test_not_an_optimizer_class_or_nothing_trainable():
    model = lora_triton.inject_lora(BUILDERS["mlp"](), lora_triton.LoraConfig(target_modules=["up"], r=2))
    with pytest.raises(TypeError, match="optimizer_cls"):
        lora_triton.create_loraplus_optimizer(model, "adam", lr=1e-3, loraplus_lr_ratio=4.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lora_triton.create_loraplus_optimizer(BUILDERS["mlp"]().requires_grad_(False), torch.optim.SGD,
                                              lr=1e-3, loraplus_lr_ratio=4.0)
