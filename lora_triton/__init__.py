"""lora_triton: a Triton-kernel accelerated LoRA runtime with PEFT's config names and file format.

Importing the package touches no GPU and does not import triton; kernels load on first use.
"""

from .config import LoraConfig
from .config_lycoris import LoHaConfig, LoKrConfig
from .io.adalora_format import load_adalora, save_adalora
from .io.hf_integration import enable_trainer_resume, load_checkpoint_adapters
from .io.peft_format import adapter_state_dict, load_adapter, read_peft_adapter, save_adapter
from .io.xlora_format import load_xlora, save_xlora
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
from .nn.adalora import (
    AdaLoraConfig,
    adalora_callback,
    inject_adalora,
    orth_regularization,
    update_and_allocate,
)
from .nn.loraplus import create_loraplus_optimizer
from .nn.peft_patch import PatchSummary, patch_peft, unpatch_peft
from .nn.summary import print_trainable_parameters, trainable_parameters
from .nn.weighted_merge import add_weighted_adapter
from .nn.xlora import XLoraModel
from .nn.xlora_config import XLoraConfig
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
    "PatchSummary",
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
    "patch_peft",
    "print_trainable_parameters",
    "enable_trainer_resume",
    "load_checkpoint_adapters",
    "quantize",
    "read_peft_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "unpatch_peft",
    "AdaLoraConfig",
    "adalora_callback",
    "inject_adalora",
    "load_adalora",
    "orth_regularization",
    "save_adalora",
    "update_and_allocate",
    "XLoraConfig",
    "XLoraModel",
    "load_xlora",
    "save_xlora",
]
