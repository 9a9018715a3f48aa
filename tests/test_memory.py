"""Saved-for-backward memory: beyond x and the parameters, a training LoraLinear keeps O(tokens * r)."""

from __future__ import annotations

import peft
import torch

from lora_triton.nn import LoraLinear


def _saved_extra_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of unique storages saved for backward, not counting x's and the parameters' storages."""
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in known and s.nbytes() > 0:
                storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()  # the graph is usable
    return sum(storages.values())


def _ours(tokens, k, n, r, p):
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(k, n), "default", r=r, lora_alpha=2 * r, lora_dropout=p).train()
    layer.base_layer.requires_grad_(False)
    return layer, torch.randn(tokens, k, requires_grad=True)


def _peft(tokens, k, n, r, p):
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(k, n))
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["proj"], r=r, lora_alpha=2 * r,
                                                      lora_dropout=p)).train()
    return model, torch.randn(tokens, k, requires_grad=True)


def test_saved_bytes_are_tokens_times_rank():
    tokens, k, n, r, p = 512, 256, 256, 4, 0.1
    ours = _saved_extra_bytes(*_ours(tokens, k, n, r, p))
    theirs = _saved_extra_bytes(*_peft(tokens, k, n, r, p))
    per_token_rank = tokens * r * 4  # U = D(x) A^T in fp32
    assert per_token_rank <= ours <= 2 * per_token_rank + 1024, ours  # U + seed; nothing tokens * in
    assert theirs >= tokens * k * 4  # PEFT keeps dropout(x) (and its mask)
    assert ours * 20 < theirs


def test_saved_bytes_do_not_grow_with_in_features():
    tokens, n, r, p = 256, 64, 4, 0.1
    small = _saved_extra_bytes(*_ours(tokens, 128, n, r, p))
    large = _saved_extra_bytes(*_ours(tokens, 1024, n, r, p))
    assert large == small
    assert _saved_extra_bytes(*_ours(2 * tokens, 128, n, r, p)) <= 2 * small + 64


def test_inference_saves_nothing():
    layer, x = _ours(64, 32, 32, 4, 0.1)
    layer.eval()
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert saved == []
