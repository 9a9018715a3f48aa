"""DoRA in mixed batches (``adapter_batch``, ``AdapterPool``): every row scaled by its own adapter's m / n.

PEFT refuses DoRA with ``adapter_names=``. Here the stacked LoRA op computes x W^T + s_a B_a A_a x per
row (adapter a of that row; plain base rows get x W^T), then each row is scaled by g_a = m_a / n_a in
the stable form y_pre + (g_a - 1) y_pre (plain LoRA adapters and base rows have g - 1 = 0), then the
bias is added: exactly what ``dora_linear`` computes for that row alone in eval mode.
"""

from __future__ import annotations

import torch

from ..ops.dora import dora_weight_norm
from ..ops.multi_lora import multi_lora_linear
from ._hook import layer_operands


def row_scale_table(layer, names: list[str]) -> torch.Tensor:
    """(g - 1) per adapter of the stack, float32 [L + 1, out]; the last row (id -1, no adapter) is zero."""
    table = torch.zeros((len(names) + 1, layer.out_features), dtype=torch.float32,
                        device=layer.base_weight().device)
    with torch.no_grad():
        for i, name in enumerate(names):
            variant = layer.lora_variant.get(name)
            if variant is not None:
                norm = variant.weight_norm(layer, name)
                table[i] = (layer.lora_magnitude_vector[name].weight.float() - norm) / norm
    return table


def dora_scale_row(layer, lora_A, lora_B, magnitude, scaling: float) -> torch.Tensor:
    """(g - 1) = (m - n) / n, float32 [out], for one adapter's tensors on this layer's frozen weight."""
    weight = layer.base_weight()
    a, b = lora_A.to(weight.device, torch.float32), lora_B.to(weight.device, torch.float32)
    norm = dora_weight_norm(weight, a, b, scaling)
    return (magnitude.to(weight.device, torch.float32) - norm) / norm


def dora_mixed_forward(layer, x, names, lora_A, lora_B, scalings, ranks, seq_ids) -> torch.Tensor:
    return scaled_mixed_forward(layer, x, row_scale_table(layer, names), lora_A, lora_B, scalings, ranks, seq_ids)


def scaled_mixed_forward(layer, x, table, lora_A, lora_B, scalings, ranks, seq_ids) -> torch.Tensor:
    """The stacked LoRA op without bias, each row scaled by ``table[id]`` ((g - 1) per adapter, last row
    zero for id -1), then the bias."""
    x, weight, bias, ids = layer_operands(layer, x, seq_ids)
    y_pre = multi_lora_linear(x, weight, None, lora_A, lora_B, scalings, ids, ranks, validate=False)
    scale = table.to(y_pre.dtype)[ids]  # [..., out]: -1 picks the zero last row
    y = torch.addcmul(y_pre, y_pre, scale)
    return y if bias is None else y.add_(bias)
