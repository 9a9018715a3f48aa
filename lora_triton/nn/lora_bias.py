"""The bias of one adapter's term in a LoRA forward: the given bias plus s * lora_B.bias (lora_bias=True).

Shared by every Linear forward path (``LoraLinear``, its 4-bit base in ``qlora``, ``grouping``'s fused
sibling GEMM and ``peft_patch`` over PEFT's own layers); a module of its own so that ``qlora``, which
``lora_linear`` imports, can use it too.
"""

from __future__ import annotations

from typing import Optional

import torch


def with_lora_bias(layer, name: str, bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``bias`` (None for a term that does not carry the base bias) plus s * lora_B[name].bias in ``dtype``;
    ``bias`` unchanged when the adapter has no lora_B bias."""
    lora_b_bias = layer.lora_B[name].bias
    if lora_b_bias is None:
        return bias
    extra = layer.scaling[name] * lora_b_bias.to(dtype)
    return extra if bias is None else bias + extra
