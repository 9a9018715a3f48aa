"""The one seam for LoRA variants (PEFT's ``variants.py`` idea).

A variant is a per-adapter object held by ``LoraLinear.lora_variant[name]`` that replaces the
plain LoRA behaviour of that adapter at five points: ``init`` (after A and B are initialised),
``forward``, ``merge_weight`` / ``unmerge_weight`` (fp32, [out, in]) and ``delete``. Plain LoRA
adapters have no variant; ``LoraLinear`` only asks ``lora_variant.get(name)``.
"""

from __future__ import annotations

from typing import Optional

import torch


class LoraVariant:
    """Interface; see ``nn/dora.py`` for the DoRA implementation."""

    kind = "lora"

    def init(self, layer, name: str) -> None:
        """Create or re-initialise the variant's own parameters (A and B are already set)."""

    def forward(self, layer, name: str, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        """The adapter's output; ``weight`` is the base weight [out, in] when this adapter also
        computes the base GEMM (it is the first active adapter), else None."""
        raise NotImplementedError

    def merge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32 [out, in], holding the adapters merged before this one) with this adapter folded in."""
        raise NotImplementedError

    def unmerge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merge_weight`` (fp32 [out, in])."""
        raise NotImplementedError

    def delete(self, layer, name: str) -> None:
        """Remove the variant's own parameters from the layer."""


def make_variant(use_dora: bool = False) -> Optional[LoraVariant]:
    """The variant an adapter's options ask for, or None for plain LoRA."""
    if use_dora:
        from .dora import DoraVariant

        return DoraVariant()
    return None
