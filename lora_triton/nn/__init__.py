"""Modules and model-level adapter management."""

from .inject import (
    active_adapters,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    inject_lora,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unmerge_adapter,
)
from .lora_linear import LoraLinear
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "LoraLinear", "ModulesToSaveWrapper", "active_adapters", "adapter_configs", "delete_adapter",
    "disable_adapters", "inject_lora", "lora_layers", "merge_adapter", "merge_and_unload", "set_adapter",
    "unmerge_adapter",
]
