"""Helpers of the reliability tests: a bit-exact fingerprint of everything a load may change."""

from __future__ import annotations

import torch
from torch import nn

from lora_triton.nn import adapter_configs

_TABLES = ("r", "lora_alpha", "scaling", "lora_dropout_p", "use_rslora", "active_adapters", "merged_adapters",
           "disable_adapters")


def _bits(t: torch.Tensor) -> tuple:
    t = t.detach().cpu().contiguous()
    return (t.dtype, tuple(t.shape), bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b"")


def fingerprint(model: nn.Module) -> dict:
    """state_dict bits, module paths and types, adapter tables, configs and requires_grad flags."""
    tables = {}
    for path, m in model.named_modules():
        entry = {k: repr(m.__dict__[k]) for k in _TABLES if k in m.__dict__}
        for table in ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save"):
            if table in m._modules:
                entry[table] = list(m._modules[table]._modules)
        if entry:
            tables[path] = entry
    return {
        "state": {k: _bits(v) for k, v in model.state_dict().items()},
        "modules": [(p, type(m).__name__) for p, m in model.named_modules()],
        "tables": tables,
        "configs": {k: repr(v) for k, v in adapter_configs(model).items()},
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def assert_same(before: dict, after: dict) -> None:
    for key in before:
        assert before[key] == after[key], f"model {key} changed"
