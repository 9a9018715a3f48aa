"""lora_triton: a Triton-kernel accelerated LoRA runtime with PEFT's config names and file format.

Importing the package touches no GPU and does not import triton; kernels load on first use.
"""

from .config import LoraConfig
from .config_lycoris import LoHaConfig, LoKrConfig
from .io.peft_format import adapter_state_dict, load_adapter, read_peft_adapter, save_adapter
from .nn import (
    LoraLinear,
    NF4Linear,
    active_adapters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    merge_adapter,
    merge_and_unload,
    quantize,
    set_adapter,
    unmerge_adapter,
)
from .nn.loraplus import create_loraplus_optimizer
from .nn.weighted_merge import add_weighted_adapter
from .ops.dora import dora_linear, dora_weight_norm
from .ops.lora_linear import lora_linear
from .ops.multi_lora import multi_lora_linear
from .ops.nf4_linear import nf4_lora_linear
from .serving import AdapterPool, adapter_batch

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "active_adapters",
    "adapter_batch",
    "add_weighted_adapter",
    "create_loraplus_optimizer",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "dora_linear",
    "dora_weight_norm",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "merge_adapter",
    "merge_and_unload",
    "multi_lora_linear",
    "nf4_lora_linear",
    "quantize",
    "read_peft_adapter",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
