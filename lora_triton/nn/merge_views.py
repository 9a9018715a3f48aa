"""Each LoRA layer type seen as one linear map, for weighted merging (``nn/weighted_merge.py``).

A LoRA adapter on any layer type is dW = s B A with A [r, in] and B [out, r] once its tensors are
flattened: on a Linear ``in``/``out`` are the features; on a Conv1d/2d/3d ``in`` = in_channels x kernel
elements (A's kernel flattened; B is a 1x1 conv, so [out, r]) and a grouped B [out, r / groups] is the
block-diagonal [out, r] it acts as; on an Embedding ``in`` = num_embeddings, ``out`` = embedding_dim
(lora_embedding_A [r, num], lora_embedding_B [dim, r]). Every combination type then works on these
matrices, for every layer type alike; a view writes the result back in the layer's own shapes.

``stored_delta`` is the delta in the layout of PEFT's ``get_delta_weight`` (Conv1D: [in, out]; Conv:
[out, in, *kernel]; Embedding: [num, dim]): DARE's random masks are drawn in that layout, so seeded
runs match PEFT's draws.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .lora_conv import LoraConv
from .lora_embedding import LoraEmbedding
from .lora_linear import LoraLinear


class LayerView:
    groups = 1

    def __init__(self, layer):
        self.layer = layer

    # -- what the layer holds --------------------------------------------------------------------
    def holds(self, name: str) -> bool:
        return name in self.layer.lora_A

    def rank(self, name: str) -> int:
        return self.layer.r[name]

    def is_dora(self, name: str) -> bool:
        return False

    def has_bias(self, name: str) -> bool:
        return self.layer.lora_B[name].bias is not None

    def dtype(self, name: str) -> torch.dtype:
        return torch.promote_types(self.raw_factors(name)[0].dtype, torch.float32)

    def raw_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as stored (PEFT's factor-wise types combine these)."""
        return self.layer.lora_A[name].weight.detach(), self.layer.lora_B[name].weight.detach()

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, in] and B [out, r]."""
        a, b = self.raw_factors(name)
        return a.to(dtype).reshape(a.shape[0], -1), b.to(dtype).reshape(b.shape[0], -1)

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.factors(name, dtype)
        return (b @ a) * self.layer.scaling[name]

    def stored_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.delta(name, dtype)

    def from_stored(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def scaled_bias(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        bias = self.layer.lora_B[name].bias
        if bias is None:
            return torch.zeros(self.out_dim, dtype=dtype, device=self.raw_factors(name)[0].device)
        return bias.detach().to(dtype) * self.layer.scaling[name]

    # -- the new adapter ---------------------------------------------------------------------------
    def add(self, name: str, rank: int, dropout: float, has_bias: bool) -> None:
        self.layer.add_adapter(name, rank, rank, dropout, False, False, has_bias)

    def write(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set the adapter from A [r, in] and B [out, r] (scaling 1)."""
        a_t, b_t = self.raw_factors(name)
        self.write_raw(name, a.reshape(a_t.shape), b.reshape(b_t.shape))

    def write_bias(self, name: str, bias: torch.Tensor) -> None:
        self.layer.lora_B[name].bias.copy_(bias)

    def write_raw(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.layer.lora_A[name].weight.copy_(a)
        self.layer.lora_B[name].weight.copy_(b)

    def delete(self, name: str) -> None:
        self.layer.delete_adapter(name)


def _dora_change(layer, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A Conv / Embedding DoRA adapter's whole change in the base weight's layout (``DoraVariant.weight_change``)."""
    return layer.lora_variant[name].weight_change(layer, name, layer.delta_weight(name).to(dtype))


class LinearView(LayerView):
    """LoraLinear: nn.Linear and GPT-2's Conv1D (stored [in, out]: fan_in_fan_out), DoRA included."""

    def __init__(self, layer: LoraLinear):
        super().__init__(layer)
        self.in_dim, self.out_dim = layer.in_features, layer.out_features

    def is_dora(self, name: str) -> bool:
        return name in getattr(self.layer, "lora_magnitude_vector", {})

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """s B A; for DoRA the whole change it makes, (m / ||W + s B A||_row) (W + s B A) - W (its eval
        forward, dense)."""
        delta = super().delta(name, dtype)
        return self.layer.lora_variant[name].weight_change(self.layer, name, delta) if self.is_dora(name) else delta

    def stored_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.delta(name, dtype)
        return delta.t() if self.layer.fan_in_fan_out else delta

    def from_stored(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.layer.fan_in_fan_out else delta


class ConvView(LayerView):
    """LoraConv: A [r, in, *k] -> [r, in * prod(k)]; B [out, r / groups, 1...] -> block-diagonal [out, r]."""

    def __init__(self, layer: LoraConv):
        super().__init__(layer)
        base = layer.base_layer
        self.groups = base.groups
        self.kernel = tuple(base.kernel_size)
        self.out_dim = base.out_channels
        self.in_dim = base.in_channels * math.prod(self.kernel)

    def is_dora(self, name: str) -> bool:
        return name in getattr(self.layer, "lora_variant", {})

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.is_dora(name):
            return _dora_change(self.layer, name, dtype).reshape(self.out_dim, -1)
        return super().delta(name, dtype)

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = super().factors(name, dtype)
        if self.groups == 1:
            return a, b
        rows = self.out_dim // self.groups  # group g: outputs g*rows.., adapter channels g*(r/groups)..
        return a, torch.block_diag(*b.split(rows))

    def stored_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.delta(name, dtype).reshape(self.out_dim, -1, *self.kernel)

    def from_stored(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.out_dim, -1)

    def write(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.groups > 1:  # keep the diagonal blocks; the caller built B block-diagonal
            rows, cols = self.out_dim // self.groups, b.shape[1] // self.groups
            b = torch.cat([b[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] for g in range(self.groups)])
        super().write(name, a, b)

    def group_order(self, ranks: list[int]) -> torch.Tensor:
        """The channel order that makes concatenated grouped adapters' B block-diagonal again: group 0's
        channels of every source, then group 1's, ..."""
        offsets = torch.tensor([0, *ranks]).cumsum(0).tolist()
        return torch.tensor([offsets[i] + g * (r // self.groups) + j for g in range(self.groups)
                             for i, r in enumerate(ranks) for j in range(r // self.groups)])


class EmbeddingView(LayerView):
    """LoraEmbedding: A = lora_embedding_A [r, num], B = lora_embedding_B [dim, r]; no bias, no dropout."""

    def __init__(self, layer: LoraEmbedding):
        super().__init__(layer)
        self.in_dim, self.out_dim = layer.num_embeddings, layer.embedding_dim

    def holds(self, name: str) -> bool:
        return name in self.layer.lora_embedding_A

    def has_bias(self, name: str) -> bool:
        return False

    def is_dora(self, name: str) -> bool:
        return name in getattr(self.layer, "lora_variant", {})

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.is_dora(name):
            return _dora_change(self.layer, name, dtype).t()
        return super().delta(name, dtype)

    def raw_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.lora_embedding_A[name].detach(), self.layer.lora_embedding_B[name].detach()

    def stored_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.delta(name, dtype).t()

    def from_stored(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()

    def add(self, name: str, rank: int, dropout: float, has_bias: bool) -> None:
        self.layer.add_adapter(name, rank, rank, False, False, False)

    def write_raw(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.layer.lora_embedding_A[name].copy_(a)
        self.layer.lora_embedding_B[name].copy_(b)


def view_of(layer) -> Optional[LayerView]:
    """The view of a LoRA layer, or None for layers weighted merging does not combine (LoHa, LoKr, ...)."""
    if isinstance(layer, LoraLinear):
        return LinearView(layer)
    if isinstance(layer, LoraConv):
        return ConvView(layer)
    if isinstance(layer, LoraEmbedding):
        return EmbeddingView(layer)
    return None
