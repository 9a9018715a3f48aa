"""lora_triton: a Triton-kernel accelerated LoRA runtime with PEFT's config names and file format.

Importing the package touches no GPU and does not import triton; kernels load on first use.
"""

from .config import LoraConfig
from .config_lycoris import LoHaConfig, LoKrConfig
from .io.peft_format import adapter_state_dict, load_adapter, read_peft_adapter, save_adapter
from .nn import (
    LoraLinear,
    active_adapters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unmerge_adapter,
)
from .ops.lora_linear import lora_linear
from .ops.multi_lora import multi_lora_linear
from .serving import AdapterPool, adapter_batch

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraLinear",
    "active_adapters",
    "adapter_batch",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "merge_adapter",
    "merge_and_unload",
    "multi_lora_linear",
    "read_peft_adapter",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
