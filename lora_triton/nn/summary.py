"""PEFT's ``print_trainable_parameters`` for any model (lora_triton-injected, patched PEFT, or plain)."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a parameter shared by several modules counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`` as PEFT does."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
