"""Dropout seeds (ops/seeds.py): checkpointed recomputation regenerates the masks, compiled runs draw
eager's seeds, and ranks of a data-parallel run draw different ones from one torch.manual_seed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import max_diff, model_input, randomize_lora, run, tiny_llama, tiny_mlp
from torch.utils.checkpoint import checkpoint

import lora_triton as lt
from lora_triton.ops import seeds

P = 0.3


def _grads(model, inputs, seed: int = 7, owner=None):
    """Loss and gradients; ``owner`` names the parameters when ``model`` wraps them."""
    owner = model if owner is None else owner
    owner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = run(model, inputs).float().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in owner.named_parameters() if p.requires_grad}


def _assert_same(got, expected, tol=1e-6):
    assert got[0] == pytest.approx(expected[0], abs=tol)
    assert got[1].keys() == expected[1].keys() and got[1]
    for name in expected[1]:
        assert max_diff(got[1][name], expected[1][name]) < tol, name


def _injected_llama():
    model = tiny_llama()
    lt.inject_lora(model, lt.LoraConfig(r=4, lora_dropout=P, target_modules=["q_proj", "k_proj", "v_proj",
                                                                             "down_proj"]))
    randomize_lora(model)
    return model.train()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_regenerates_the_masks(use_reentrant):
    model = _injected_llama()
    inputs = model_input("llama")
    expected = _grads(model, inputs)
    assert _grads(model, inputs, seed=8)[0] != pytest.approx(expected[0], abs=1e-6)  # the masks matter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if use_reentrant:
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        _assert_same(_grads(model, inputs), expected)


def test_hf_gradient_checkpointing_on_a_patched_peft_model():
    peft = pytest.importorskip("peft", reason="patch_peft accelerates PEFT models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_dropout=P, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    lt.patch_peft(pm)
    pm.train()
    inputs = model_input("llama")
    expected = _grads(pm, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _assert_same(_grads(pm, inputs), expected)


class _Checkpointed(torch.nn.Module):
    def __init__(self, inner, use_reentrant: bool):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def forward(self, x):
        h = torch.relu(self.inner.inp(x))
        for block in self.inner.layers:
            h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.inner.head(self.inner.norm(h))


@pytest.mark.parametrize("eager", ["1", "0"])  # the eager fast path and the custom ops (ops/eager.py)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_utils_checkpoint_regenerates_the_masks(use_reentrant, eager, monkeypatch):
    monkeypatch.setenv("LORA_TRITON_EAGER", eager)
    model = lt.inject_lora(tiny_mlp(), lt.LoraConfig(r=3, lora_dropout=P, target_modules=["inp", "up", "down"]))
    randomize_lora(model)
    model.train()
    inputs = model_input("mlp")
    expected = _grads(model, inputs)
    _assert_same(_grads(_Checkpointed(model, use_reentrant), inputs, owner=model), expected)


def test_compiled_forward_draws_eager_seeds():
    """Inductor would otherwise replace torch's generator with its own stream (different masks)."""
    torch._dynamo.reset()
    model = lt.inject_lora(tiny_mlp(), lt.LoraConfig(r=3, lora_dropout=P, target_modules=["inp", "up", "down"]))
    randomize_lora(model)
    model.train()
    x = model_input("mlp")["x"]
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(3)
        eager = [model(x).square().mean().item() for _ in range(2)]
        torch.manual_seed(3)
        got = [compiled(x).square().mean().item() for _ in range(2)]
    assert eager[0] != pytest.approx(eager[1], abs=1e-6)  # each call draws fresh seeds
    assert got == pytest.approx(eager, abs=1e-5)


def test_rank_offset_rule(monkeypatch):
    torch.manual_seed(0)
    rank0 = seeds.draw_seeds(3, torch.device("cpu"))
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 3)
    torch.manual_seed(0)
    rank3 = seeds.draw_seeds(3, torch.device("cpu"))
    assert torch.equal(rank3, (rank0 + 3 * seeds.RANK_STRIDE) % seeds.SEED_LIMIT)
    assert (rank3 >= 0).all() and (rank3 < seeds.SEED_LIMIT).all()


def test_patched_peft_model_compiles_fullgraph_with_eager_masks():
    peft = pytest.importorskip("peft", reason="patch_peft accelerates PEFT models")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(r=3, lora_dropout=P, init_lora_weights=False,
                                                             target_modules=["up", "down"]))
    randomize_lora(pm)
    lt.patch_peft(pm)
    pm.train()
    x = model_input("mlp")["x"]
    expected = _grads(pm, {"x": x})
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    _assert_same(_grads(compiled, {"x": x}, owner=pm), expected, tol=1e-5)
