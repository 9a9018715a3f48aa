"""DoRA beyond the dense Linear: on ``nn.Embedding``, ``nn.Conv1d/2d/3d`` and a 4-bit ``NF4Linear`` base.

PEFT's semantics (``DoraEmbeddingLayer``, ``_DoraConvNdLayer``, DoRA over bitsandbytes' Linear4bit),
each with g = m / n, n detached, and the stable g - 1 = (m - n) / n:

* Embedding E [num, dim], A [r, num], B [dim, r]: n_j = ||E[:, j] + s (B A)^T[:, j]|| per embedding
  dimension (the factored norm on E^T), m [dim]; out = g * result + g * s * A^T[ids] B^T (times the
  base's embed_scale), ``result`` being everything before this adapter (base included), as in PEFT.
* Conv: n per output channel over every other dim of W + s B A (the factored norm on the flattened
  kernel), m [1, out, 1, ...] (PEFT's shape). p = 0 / eval: result + (g - 1)(result - b) + g s B(A(x));
  with dropout result + (g - 1) conv(D(x), W) + g s B(A(D(x))). The second conv uses the base's own
  padding_mode (PEFT's F.convNd ignores it: it differs from PEFT only for non-"zeros" padding). groups > 1
  is refused (PEFT's DoRA norm reshapes a grouped B into the wrong matrix).
* NF4 base: n from the dequantized weight, one chunk of rows at a time (||W_i||^2 and W A^T per chunk:
  never a full-precision copy of W). p = 0: y = g * (x W^T + s U B^T) + b with the LoRA term inside the
  fused 4-bit GEMM; with dropout PEFT's form, a second 4-bit GEMM on D(x).

DoRA after other active adapters (any of these layers and ``LoraLinear``) follows PEFT: at p = 0 it
rescales the sum of the adapters before it, with dropout it does not. Dropout masks here come from
torch's generator (``F.dropout``, like PEFT's ``nn.Dropout``). These paths compose ops with autograd; the
fused ``dora_linear`` kernels cover the dense Linear as first adapter.

``DoraHooks`` is mixed into ``LoraEmbedding`` / ``LoraConv``: it holds ``lora_magnitude_vector`` and
``lora_variant`` like ``LoraLinear`` and routes DoRA adapters' forward, merge, unmerge and delete here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lora_linear import lora_linear
from ..ops.nf4_linear import nf4_lora_linear
from ..reference.dora import norm_from_products
from .dora import DoraVariant, dora_onto
from .nf4_linear import NF4Linear

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAGNITUDE = "lora_magnitude_vector"


def dora_variant_for(base_layer: Optional[nn.Module]) -> DoraVariant:
    if isinstance(base_layer, nn.Embedding):
        return DoraEmbeddingVariant()
    if type(base_layer) in _CONVS:
        return DoraConvVariant()
    if isinstance(base_layer, NF4Linear):
        return Nf4DoraVariant()
    return DoraVariant()


def dora_shapes(base_layer: nn.Module, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The magnitude's PEFT key and shape for a DoRA adapter on this Embedding / Conv base (none without DoRA)."""
    if not use_dora:
        return {}
    if isinstance(base_layer, nn.Embedding):
        return {MAGNITUDE: (base_layer.weight.shape[1],)}
    return {MAGNITUDE: (1, base_layer.out_channels) + (1,) * (base_layer.weight.dim() - 2)}


class _AdapterLayerDora:
    """DoRA on an ``AdapterLayer`` (Embedding / Conv): ``DoraVariant``'s merge, unmerge and weight change on the
    layer's own weight layout (the layer type's ``factors``, ``flat`` and ``factor_view``), and the output from
    its ``terms``."""

    def merge_delta(self, layer, name: str) -> torch.Tensor:
        return layer.delta_weight(name)

    def stored_base(self, layer) -> torch.Tensor:
        return layer.merge_value(layer.base_layer.weight)

    def unmerged_base(self, layer) -> torch.Tensor:
        return layer.unmerged_weight()

    def add_output(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # result + (g - 1) base + g lora; for the embedding (base = result) that is PEFT's g result + g lora
        # in the stable form: in a half dtype g itself would round away m / n - 1.
        return dora_onto(result, *self.terms(layer, name, x, result))

    def delta(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term alone, for mixed batches (each row holds one adapter): base(x) recomputed."""
        base, lora, g, gm1 = self.terms(layer, name, x, layer.base_layer(x))
        return gm1 * base + g * lora


class DoraEmbeddingVariant(_AdapterLayerDora, DoraVariant):
    def factors(self, layer, name):
        return (layer.base_layer.weight.t(), layer.lora_embedding_A[name], layer.lora_embedding_B[name],
                float(layer.scaling[name]))

    def magnitude_shape(self, layer):
        return (layer.embedding_dim,)

    @staticmethod
    def flat(weight):
        return weight.t()

    @staticmethod
    def factor_view(weight):
        return (1, -1)

    def terms(self, layer, name, x, result):
        """(result, s A^T[ids] B^T [* embed_scale], g, g - 1): PEFT's out = g * result + g * lora."""
        lora = layer.lora_delta(name, x)
        g, gm1 = self.scales(layer, name, result.dtype)
        return result, lora.to(result.dtype), g, gm1


class DoraConvVariant(_AdapterLayerDora, DoraVariant):
    def factors(self, layer, name):
        return (layer.base_layer.weight.flatten(1), layer.lora_A[name].weight.flatten(1),
                layer.lora_B[name].weight.flatten(1), float(layer.scaling[name]))

    def magnitude_shape(self, layer):
        return (1, layer.out_features) + (1,) * (layer.base_layer.weight.dim() - 2)

    @staticmethod
    def flat(weight):
        return weight.flatten(1)

    @staticmethod
    def factor_view(weight):
        return (-1,) + (1,) * (weight.dim() - 1)

    def terms(self, layer, name, x, result):
        base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
        spatial = base.weight.dim() - 2
        channel_view = (1,) * (result.dim() - spatial - 1) + (-1,) + (1,) * spatial  # batched or not
        g, gm1 = self.scales(layer, name, result.dtype, channel_view)
        p = layer.lora_dropout_p[name] if layer.training else 0.0
        if p == 0.0:
            h = x
            base_out = result if base.bias is None else result - base.bias.to(result.dtype).view(channel_view)
        else:
            h = F.dropout(x, p, training=True)
            base_out = base._conv_forward(h, base.weight.to(x.dtype), None)
        u = a._conv_forward(h, a.weight.to(x.dtype), None)
        lora = b._conv_forward(u, b.weight.to(x.dtype), None) * layer.scaling[name]
        return base_out, lora, g, gm1


class Nf4DoraVariant(DoraVariant):
    """DoRA over a 4-bit base; once merged the base is a full-precision Linear and the dense variant applies."""

    def factors(self, layer, name):
        if not isinstance(layer.base_layer, NF4Linear):
            return super().factors(layer, name)
        # The packed bytes stand for W in the cache key: a requantization replaces them.
        return layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight, \
            float(layer.scaling[name])

    def compute_norm(self, layer, weight, a, b, scaling):
        if not isinstance(layer.base_layer, NF4Linear):
            return super().compute_norm(layer, weight, a, b, scaling)
        w = layer.base_layer.nf4_weight()
        a32 = a.detach().float()
        sq = torch.empty(w.out_features, dtype=torch.float32, device=a.device)
        wa = torch.empty((w.out_features, a.shape[0]), dtype=torch.float32, device=a.device)
        with torch.no_grad():
            for r0, r1 in w.row_chunks():  # one chunk of dequantized rows alive at a time
                rows = w.rows(r0, r1, torch.float32)
                sq[r0:r1] = torch.linalg.vector_norm(rows, dim=1).square()
                torch.mm(rows, a32.t(), out=wa[r0:r1])
            return norm_from_products(sq, wa, a32, b.detach().float(), scaling)

    def forward_nf4(self, layer, name, x, result, weight, bias, dropout_p):
        """``weight``: the NF4Weight; ``bias``: the base's (x's dtype); ``result``: None for the first adapter."""
        a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
        if result is not None:
            return self.onto(layer, name, x, result, bias, dropout_p, lambda h: nf4_lora_linear(h, weight, None))
        g, gm1 = self.scales(layer, name, x.dtype)
        if dropout_p == 0.0:
            y_pre = nf4_lora_linear(x, weight, None, a, b, s, 0.0)  # x W^T + s U B^T in one 4-bit GEMM
            y = torch.addcmul(y_pre, y_pre, gm1)
            return y if bias is None else y + bias
        h = F.dropout(x, dropout_p, training=True)
        lora = lora_linear(h, None, None, a, b, s, 0.0)
        return dora_onto(nf4_lora_linear(x, weight, bias), nf4_lora_linear(h, weight, None), lora, g, gm1)


class DoraHooks:
    """Mixed into ``LoraEmbedding`` / ``LoraConv`` (before ``AdapterLayer``): DoRA adapters' state and routing."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ModuleDict()  # PEFT's name
        self.lora_variant: dict = {}

    def attach_variant(self, name: str, use_dora: bool, lora_bias: bool = False) -> None:
        """Called at the end of ``add_adapter``, once the adapter's factors are initialised."""
        if not use_dora:
            return
        if lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (PEFT refuses it too)")
        groups = getattr(self.base_layer, "groups", 1)
        if groups > 1:
            raise NotImplementedError(f"use_dora=True on a conv with groups={groups} is not supported (the rank-r "
                                      "update is not a grouped conv; PEFT's DoRA norm is wrong there)")
        variant = dora_variant_for(self.base_layer)
        self.lora_variant[name] = variant
        variant.init(self, name)

    def dora_tensors(self, name: str, tensors: dict) -> dict:
        """``tensors`` plus the adapter's magnitude under PEFT's key (no ``.weight``)."""
        if name in self.lora_magnitude_vector:
            tensors[MAGNITUDE] = self.lora_magnitude_vector[name].weight
        return tensors

    def adapter_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term alone (mixed batches): DoRA's from its variant, else the layer's ``lora_delta``."""
        variant = self.lora_variant.get(name)
        return self.lora_delta(name, x) if variant is None else variant.delta(self, name, x)

    def add_adapter_output(self, name, x, result):
        variant = self.lora_variant.get(name)
        if variant is None:
            return super().add_adapter_output(name, x, result)
        return variant.add_output(self, name, x, result)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.lora_variant.pop(name, None)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight in merge precision with the merged adapters taken out, last merged first."""
        w = self.merge_value(self.base_layer.weight)
        for n in reversed(self.merged_adapters):
            variant = self.lora_variant.get(n)
            w = variant.unmerge_weight(self, n, w) if variant is not None else w - self.delta_weight(n)
        return w

    def _merged_values(self, names):
        if not any(n in self.lora_variant for n in names):
            return super()._merged_values(names)
        w = self.merge_value(self.base_layer.weight)
        for n in names:  # in order: a DoRA merge scales what is folded before it
            variant = self.lora_variant.get(n)
            w = variant.merge_weight(self, n, w) if variant is not None else w + self.delta_weight(n)
        return w, self._merged_bias(names, sign=1)

    def _unmerge_value(self, names):
        if not any(n in self.lora_variant for n in names):
            return super()._unmerge_value(names)
        return self.unmerged_weight()  # names are the merged adapters: undone one by one, last merged first
