"""The one seam for LoRA variants (PEFT's ``variants.py`` idea).

A variant is a per-adapter object held by ``LoraLinear.lora_variant[name]`` that replaces the
plain LoRA behaviour of that adapter at a few points: ``init`` (after A and B are initialised),
``forward`` (first active adapter) / ``forward_onto`` (after others: the sum so far is passed in),
``merge_weight`` / ``unmerge_weight`` (fp32, [out, in]) and ``delete``. Plain LoRA adapters have no
variant; layers only ask ``lora_variant.get(name)``. The Embedding / Conv layers (``LoraEmbedding``,
``LoraConv``) hold variants the same way, wired by ``nn/dora_layers.DoraHooks``.
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

    def forward_onto(self, layer, name: str, x: torch.Tensor, result: torch.Tensor, weight, bias,
                     dropout_p: float) -> torch.Tensor:
        """``result`` (the output of the adapters before this one, base included) with this adapter applied."""
        return result + self.forward(layer, name, x, None, None, dropout_p)

    def merge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32 [out, in], holding the adapters merged before this one) with this adapter folded in."""
        raise NotImplementedError

    def unmerge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merge_weight`` (fp32 [out, in])."""
        raise NotImplementedError

    def delete(self, layer, name: str) -> None:
        """Remove the variant's own parameters from the layer."""


def make_variant(use_dora: bool = False, base_layer=None) -> Optional[LoraVariant]:
    """The variant an adapter's options ask for on this base layer, or None for plain LoRA."""
    if use_dora:
        from .dora_layers import dora_variant_for

        return dora_variant_for(base_layer)
    return None
