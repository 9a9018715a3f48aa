"""AdaLoRA: the same losses and rank allocation as PEFT step by step; PEFT's files load here with its logits
and ours in PEFT (rank_pattern masks, sliced tensors, rank 0); exact gradients; clear errors."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from models import max_diff, model_input, tiny_gpt2, tiny_llama

import lora_triton
from lora_triton.nn.adalora import SVDLinear, adalora_state

KW = dict(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, lora_alpha=8)
STEPS = 8


def _peft(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # task_type: PEFT adds the orthogonal term only through PeftModelForCausalLM (a bare PeftModel skips it)
        return peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(task_type="CAUSAL_LM", **{**KW, **kw}))


def _ours_like(pm, **kw):
    ours = lora_triton.inject_adalora(tiny_llama(), lora_triton.AdaLoraConfig(**{**KW, **kw}))
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(theirs[n])
    return ours


def _train_both(pm, ours, steps=STEPS):
    """SGD on the same batches, update_and_allocate after each step; yields (step, losses, patterns)."""
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (pm, ours)]
    pm.train()
    ours.train()
    for step in range(steps):
        inputs = model_input("llama", seed=step)
        losses = []
        for model, opt in zip((pm, ours), opts):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        pm.base_model.update_and_allocate(step)
        lora_triton.update_and_allocate(ours, step)
        for opt in opts:
            opt.zero_grad()
        theirs = pm.peft_config["default"].rank_pattern
        theirs = None if theirs is None else {k.replace(".default", ""): v for k, v in theirs.items()}
        yield step, losses, theirs, adalora_state(ours).config.rank_pattern


def test_same_allocation_as_peft_step_by_step():
    pm = _peft()
    ours = _ours_like(pm)
    kept = []
    for step, (loss_p, loss_o), theirs, mine in _train_both(pm, ours):
        assert abs(loss_p - loss_o) <= 1e-5 * abs(loss_p), f"step {step}"
        assert mine == theirs, f"step {step}: rank patterns differ"
        kept.append(None if mine is None else sum(map(sum, mine.values())))
    assert kept[:2] == [None, None] and kept[-1] == KW["target_r"] * 4, kept  # 4 layers x target_r at the end
    e_theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if "lora_E" in k}
    assert max(max_diff(p, e_theirs[n]) for n, p in ours.named_parameters() if "lora_E" in n) <= 1e-6


@pytest.fixture(scope="module")
def peft_trained(tmp_path_factory):
    """A PEFT AdaLoRA adapter after a full schedule (rank_pattern set, tensors sliced on save)."""
    pm = _peft(target_r=1)
    ours = _ours_like(pm, target_r=1)
    for _ in _train_both(pm, ours):
        pass
    directory = tmp_path_factory.mktemp("adalora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(directory)
    return pm.eval(), ours.eval(), str(directory)


def test_peft_saved_adapter_loads_here(peft_trained):
    pm, _, directory = peft_trained
    pattern = json.load(open(f"{directory}/adapter_config.json"))["rank_pattern"]
    assert any(sum(v) < KW["init_r"] for v in pattern.values())
    inputs = model_input("llama", seed=99)
    model = lora_triton.load_adapter(tiny_llama(), directory).eval()  # dispatched on peft_type ADALORA
    with torch.no_grad():
        expected, got = pm(**inputs).logits, model(**inputs).logits
    assert max_diff(got, expected) <= 1e-5
    ranks = {p: m.r["default"] for p, m in model.named_modules() if isinstance(m, SVDLinear)}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}


def test_our_save_loads_in_peft_and_here(peft_trained, tmp_path):
    _, ours, _ = peft_trained
    inputs = model_input("llama", seed=98)
    with torch.no_grad():
        expected = ours(**inputs).logits
    lora_triton.save_adalora(ours, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    again = lora_triton.load_adalora(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert max_diff(pm(**inputs).logits, expected) <= 1e-5
        assert max_diff(again(**inputs).logits, expected) <= 1e-6


def test_rank_zero_layer_round_trips(tmp_path):
    model = lora_triton.inject_adalora(tiny_gpt2(), lora_triton.AdaLoraConfig(
        target_modules=["c_attn"], fan_in_fan_out=True, init_r=3, total_step=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = adalora_state(model)
    state.config.rank_pattern = {"transformer.h.0.attn.c_attn.lora_E": [False, False, False],
                                 "transformer.h.1.attn.c_attn.lora_E": [True, False, True]}
    state.allocator.mask_using_rank_pattern(model, state.config.rank_pattern)
    inputs = model_input("gpt2")
    with torch.no_grad():
        expected = model(**inputs).logits
    lora_triton.save_adalora(model, str(tmp_path))
    again = lora_triton.load_adalora(tiny_gpt2(), str(tmp_path))
    assert [m.r["default"] for _, m in again.named_modules() if isinstance(m, SVDLinear)] == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    with torch.no_grad():
        assert max_diff(again(**inputs).logits, expected) <= 1e-6
        assert max_diff(pm(**inputs).logits, expected) <= 1e-5


def test_gradients_of_a_e_b_are_exact_fp64():
    torch.manual_seed(1)
    base = torch.nn.Linear(13, 7).double()
    layer = SVDLinear(base)
    layer.add_adapter("default", 3, 6.0)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    y = layer(x)
    want = base(x) + (x @ (a * e).t() @ b.t()) * 6.0 / (3 + 1e-5)
    assert max_diff(y, want) <= 1e-12
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, e, b), dy)
    ref = torch.autograd.grad(want, (x, a, e, b), dy)
    # The op returns dA / dB accumulated in fp32 (its contract), so those match to fp32 rounding.
    assert max_diff(got[0], ref[0]) <= 1e-12
    assert all(max_diff(g, r) <= 1e-6 * r.abs().max() for g, r in zip(got[1:], ref[1:]))


def test_orth_regularization_is_added_to_the_loss():
    model = lora_triton.inject_adalora(tiny_llama(), lora_triton.AdaLoraConfig(**KW))
    inputs = model_input("llama")
    reg = lora_triton.orth_regularization(model)
    a = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert reg > 0 and reg.requires_grad and a.requires_grad
    out = model(**inputs, labels=inputs["input_ids"])
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                              inputs["input_ids"][:, 1:].reshape(-1))
    assert abs(out.loss.item() - (plain.item() + reg.item())) <= 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(total_step=None), "total_step"), (dict(tinit=6, tfinal=2), "budgeting phase"),
    (dict(beta1=1.0), "beta1"), (dict(orth_reg_weight=-1.0), "orth_reg_weight"), (dict(init_r=0), "init_r"),
    (dict(rank_pattern={"x.lora_E": [True]}), "rank_pattern"), (dict(peft_type="LORA"), "ADALORA")])
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_triton.AdaLoraConfig(**{**KW, **bad})


def test_update_without_gradients_is_a_clear_error():
    model = lora_triton.inject_adalora(tiny_llama(), lora_triton.AdaLoraConfig(**KW))
    with pytest.raises(RuntimeError, match="after backward"):
        lora_triton.update_and_allocate(model, 0)


def test_trainer_callback_runs_the_allocator():
    pytest.importorskip("transformers", reason="the callback is a transformers TrainerCallback")
    from types import SimpleNamespace

    from transformers import TrainerCallback

    model = lora_triton.inject_adalora(tiny_llama(), lora_triton.AdaLoraConfig(**{**KW, "tinit": 0}))
    callback = lora_triton.adalora_callback(model)
    assert isinstance(callback, TrainerCallback)
    inputs = model_input("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    callback.on_optimizer_step(None, SimpleNamespace(global_step=1), None)
    state = adalora_state(model)
    assert state.allocator.exp_avg_ipt and state.config.rank_pattern is not None
