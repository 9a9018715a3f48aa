"""LoraConv: LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` in PEFT's layout.

``lora_A.<name>`` is a conv from in_channels to r with the base's kernel size, stride, padding,
**dilation** and **padding_mode** (PEFT copies only kernel, stride and padding, so its forward fails on
a dilated conv and pads the adapter with zeros where the base reflects); ``lora_B.<name>`` is a 1x1
conv from r to out_channels with the base's groups (PEFT's layout: B [out, r / groups, 1...]; r must
divide by groups). y = base(x) + s * B(A(dropout(x))). The adapter weights are cast to x's dtype, not x
to theirs. Merging folds s * B A into the base kernel (groups == 1 only, as in PEFT: with groups > 1 the
adapter is not a grouped conv). Pure PyTorch: runs on any device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layer import AdapterLayer
from .dora_layers import DoraHooks
from .lora_linear import init_lora_pair

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraConv(DoraHooks, AdapterLayer):  # DoraHooks: use_dora (nn/dora_layers.py)
    param_dicts = ("lora_A", "lora_B")
    setting_dicts = ("scaling", "r", "lora_alpha", "use_rslora", "lora_dropout_p")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True,
                 lora_bias: bool = False, use_dora: bool = False):
        if type(base_layer) not in CONV_TYPES:
            raise TypeError(f"LoraConv wraps nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias,
                         use_dora)
        self.active_adapters = [adapter_name]

    @staticmethod
    def adapter_shapes(base_layer: nn.Module, r: int, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        ones = (1,) * (base_layer.weight.dim() - 2)
        shapes = {"lora_A.weight": (r, base_layer.in_channels, *base_layer.kernel_size),
                  "lora_B.weight": (base_layer.out_channels, r // base_layer.groups, *ones)}
        if lora_bias:
            shapes["lora_B.bias"] = (base_layer.out_channels,)
        return shapes

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights=True, lora_bias: bool = False, use_dora: bool = False) -> None:
        self._check_new(name)
        base = self.base_layer
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if r % base.groups:
            raise ValueError(f"a {type(base).__name__} with groups={base.groups} needs a rank divisible by groups, "
                             f"got r={r} (as in PEFT); choose another r or do not target this layer")
        kw = dict(device=base.weight.device, dtype=self.adapter_dtype())
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                 bias=False, padding_mode=base.padding_mode, **kw)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, **kw)
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, lora_alpha, use_rslora
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout_p[name] = float(lora_dropout)
        init_lora_pair(self.lora_A[name], self.lora_B[name], init_lora_weights, r, " on convs")
        self.attach_variant(name, use_dora, lora_bias)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            out["lora_B.bias"] = self.lora_B[name].bias
        return self.dora_tensors(name, out)

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s (B(A(D(x))) + lora_B.bias), the plain LoRA term (``DoraHooks.adapter_forward`` routes DoRA)."""
        a, b = self.lora_A[name], self.lora_B[name]
        p = self.lora_dropout_p[name] if self.training else 0.0
        h = F.dropout(x, p, training=True) if p > 0.0 else x
        # _conv_forward applies the base's padding_mode, which F.convNd alone would not.
        u = a._conv_forward(h, a.weight.to(x.dtype), None)
        bias = None if b.bias is None else b.bias.to(x.dtype)
        return b._conv_forward(u, b.weight.to(x.dtype), bias) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise NotImplementedError(f"merging LoRA into a conv with groups={self.base_layer.groups} is not "
                                      "supported (the adapter is not a grouped conv; PEFT refuses it too)")
        a = self.merge_value(self.lora_A[name].weight)
        b = self.merge_value(self.lora_B[name].weight).flatten(1)  # [out, r]
        return torch.einsum("or,r...->o...", b, a) * self.scaling[name]

    def delta_bias(self, name: str) -> Optional[torch.Tensor]:
        bias = self.lora_B[name].bias
        return None if bias is None else self.merge_value(bias) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names())
        return f"in_channels={self.in_features}, out_channels={self.out_features}, adapters=[{ranks}]"
