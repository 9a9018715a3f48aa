"""PEFT's modules_to_save: a trainable copy of a whole module per adapter."""

from __future__ import annotations

import copy

from torch import nn

from .batch_slot import mixed_batch_slot


class ModulesToSaveWrapper(nn.Module):
    mixed_batch = mixed_batch_slot()  # per thread, as LoraLinear's

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.mixed_batch = None  # set by serving.adapter_batch: (wrapper, *args, **kwargs) -> output

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.mixed_batch is not None:
            return self.mixed_batch(self, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.modules_to_save]
        if self.disable_adapters or not active:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[active[0]](*args, **kwargs)

    def __getattr__(self, name):
        # Code around the model reads e.g. `lm_head.weight`: answer with the original's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original_module"), name)
