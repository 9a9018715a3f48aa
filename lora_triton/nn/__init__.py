"""Modules and model-level adapter management."""

from .grouping import group_siblings, ungroup_siblings
from .inject import (
    active_adapters,
    adapter_configs,
    adapter_layers,
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
from .nf4_linear import NF4Linear
from .quantize import quantize

__all__ = [
    "LoraLinear", "ModulesToSaveWrapper", "NF4Linear", "quantize",
    "active_adapters", "adapter_configs", "adapter_layers", "delete_adapter",
    "disable_adapters", "group_siblings", "inject_lora", "lora_layers", "merge_adapter", "merge_and_unload",
    "set_adapter", "ungroup_siblings", "unmerge_adapter",
]
