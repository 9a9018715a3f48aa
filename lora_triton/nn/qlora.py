"""What ``LoraLinear`` does differently over a 4-bit ``NF4Linear`` base: forward, merge, unmerge, unload.

Merging an adapter into a 4-bit base would round W_deq + s B A to 4 bits again, so ``merge`` swaps the
base for a full-precision ``nn.Linear`` in the compute dtype holding W_deq + sum s B A (fp32 sums, one
rounding) and the bias plus s * lora_B.bias; the 4-bit layer is kept aside and ``unmerge`` restores it
bit for bit. ``merge_and_unload`` returns that Linear, or with ``requantize=True`` quantizes it again
(with a warning: the result is not the merged model, it carries a second 4-bit rounding).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops.lora_linear import lora_linear
from ..ops.nf4_linear import nf4_lora_linear
from .lora_bias import with_lora_bias
from .nf4_linear import NF4Linear

_KEPT = "_quantized_base"


def qlora_forward(layer, x: torch.Tensor, active: list[str]) -> torch.Tensor:
    """The first active adapter rides in the fused 4-bit GEMM; further ones add LoRA-only terms. A DoRA
    adapter, first or not, goes to its variant (``Nf4DoraVariant.forward_nf4``, nn/dora_layers.py)."""
    base: NF4Linear = layer.base_layer
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    bias = None if base.bias is None else base.bias.to(x.dtype)
    weight = base.nf4_weight()
    y = None
    for name in active:
        scale, lora_b = layer.scaling[name], layer.lora_B[name]
        term_bias = with_lora_bias(layer, name, bias if y is None else None, x.dtype)
        p = layer.lora_dropout_p[name] if layer.training else 0.0
        variant = layer.lora_variant.get(name)
        if variant is not None:  # DoRA over the 4-bit base (nn/dora_layers.py)
            y = variant.forward_nf4(layer, name, x, y, weight, term_bias, p)
            continue
        if y is None:
            y = nf4_lora_linear(x, weight, term_bias, layer.lora_A[name].weight, lora_b.weight, scale, p)
        else:
            y = y + lora_linear(x, None, term_bias, layer.lora_A[name].weight, lora_b.weight, scale, p)
    return y


def merge_quantized(layer, names: list[str], safe_merge: bool) -> list[str]:
    base: NF4Linear = layer.base_layer
    # Rounded once from fp32 to the compute dtype; safe_merge checks these rounded values (issue 8).
    merged_w, merged_b = layer.merged_as_stored(names)
    if safe_merge and not (merged_w.isfinite().all() and (merged_b is None or merged_b.isfinite().all())):
        raise ValueError(f"safe_merge: merging adapters {names} gives non-finite weights in {merged_w.dtype}; "
                         "nothing was changed")
    dtype, dev = base.compute_dtype, base.weight.device
    if merged_b is None and base.bias is not None:
        merged_b = base.bias.detach().to(dtype)
    full = nn.Linear(base.in_features, base.out_features, bias=merged_b is not None, device=dev, dtype=dtype)
    with torch.no_grad():
        full.weight.copy_(merged_w)
        if merged_b is not None:
            full.bias.copy_(merged_b)
    full.requires_grad_(False)
    full.train(base.training)
    layer.__dict__[_KEPT] = base  # not a submodule: it must not show up in state_dict / parameters
    layer.base_layer = full
    layer.merged_adapters.extend(names)
    return names


def unmerge_quantized(layer) -> bool:
    """Restore the 4-bit base kept by ``merge_quantized``; False when the layer holds none."""
    base = layer.__dict__.pop(_KEPT, None)
    if base is None:
        return False
    layer.base_layer = base
    layer.merged_adapters = []
    return True


def unloaded_base(layer, requantize: bool = False) -> nn.Module:
    """The layer's base for ``merge_and_unload``: a merged full-precision Linear, or requantized."""
    kept = layer.__dict__.pop(_KEPT, None)
    base = layer.base_layer
    if kept is None or not requantize:
        return base
    warnings.warn("merge_and_unload(requantize=True) rounds the merged weights to 4 bits again: the model "
                  "differs from the merged one by a second quantization error", stacklevel=3)
    new = NF4Linear.from_weight(base.weight.detach(), None if base.bias is None else base.bias.detach(),
                                kept.quant_type, kept.blocksize, kept.double_quant, kept.compute_dtype)
    new.train(base.training)
    return new
