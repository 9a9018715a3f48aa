"""LoraLinear: a frozen Linear (or GPT-2 Conv1D) plus any number of named LoRA adapters.

Parameter names mirror PEFT's (``base_layer.weight``, ``lora_A.<name>.weight``,
``lora_B.<name>.weight``) so state dicts map onto PEFT's format by renaming only.
The forward calls ``ops.lora_linear``; it never builds dropout(x) or a mask itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.lora_linear import lora_linear
from .batch_slot import mixed_batch_slot
from .lora_bias import with_lora_bias
from .nf4_linear import NF4Linear, is_bnb_linear4bit
from .qlora import merge_quantized, qlora_forward, unmerge_quantized
from .variants import make_variant

_UNSET = object()


def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` for a parameter (or None registered in its place), read from ``_parameters`` without
    ``nn.Module.__getattr__``; anything else (a parametrization's property, a buffer) by plain getattr."""
    value = module._parameters.get(name, _UNSET)
    return getattr(module, name) if value is _UNSET else value


def _dtype_mismatch(x: torch.Tensor, weight: torch.Tensor) -> TypeError:
    """The error for an input whose dtype is not the base weight's (no autocast): one message, both forwards."""
    return TypeError(f"input dtype {x.dtype} does not match the base layer's weight dtype {weight.dtype}")


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a Linear whose weight is stored [in, out]."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


def is_supported_base(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, NF4Linear)) or is_conv1d(layer)


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base: Linear's weight is [out, in], Conv1D's [in, out],
    NF4Linear's packed bytes have no such shape (it says its features)."""
    if isinstance(layer, NF4Linear):
        return layer.in_features, layer.out_features
    w = layer.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(layer) else (w.shape[1], w.shape[0])


def merge_is_finite(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return bool(weight.isfinite().all()) and (bias is None or bool(bias.isfinite().all()))


def init_lora_pair(a: nn.Module, b: nn.Module, init_lora_weights, r: int, where: str = "") -> None:
    """PEFT's LoRA inits for the modules A and B (Linear or conv): True (A kaiming-uniform, B 0), "gaussian"
    (A normal with std 1 / r, B 0), False (left random); B's bias zeroed. ``where`` ends the error."""
    with torch.no_grad():
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a.weight, std=1.0 / r)
            nn.init.zeros_(b.weight)
        elif init_lora_weights is not False:
            raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not supported{where}")
        if b.bias is not None:
            nn.init.zeros_(b.bias)


class LoraLinear(nn.Module):
    mixed_batch = mixed_batch_slot()  # per thread: other threads never run a batch's adapters

    def __init__(self, base_layer: nn.Module, adapter_name: Optional[str] = "default", r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights=True, lora_bias: bool = False, use_dora: bool = False):
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        if is_bnb_linear4bit(base_layer):
            raise TypeError("bitsandbytes' Linear4bit is adopted by lora_triton.quantize(model) (no requantization); "
                            "call it before adding adapters")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA magnitudes (nn/dora.py), PEFT's name
        self.lora_variant: dict = {}  # adapter name -> LoraVariant (nn/variants.py); plain LoRA has none
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self.mixed_batch = None
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias,
                             use_dora=use_dora)
            self.active_adapters = [adapter_name]

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights=True, lora_bias: bool = False,
                    use_dora: bool = False) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer (have {list(self.lora_A)})")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if use_dora and lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (PEFT refuses it too)")
        device = self.base_layer.weight.device
        # Adapters stay fp32 on a half-precision base (PEFT's default); the op casts them, not x.
        dtype = self.base_layer.weight.dtype if self.base_layer.weight.dtype == torch.float64 else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, device=device, dtype=dtype)
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.use_rslora[name] = use_rslora
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout_p[name] = float(lora_dropout)
        variant = make_variant(use_dora=use_dora, base_layer=self.base_layer)
        if variant is not None:
            self.lora_variant[name] = variant
        self.reset_adapter(name, init_lora_weights)

    def reset_adapter(self, name: str, init_lora_weights=True) -> None:
        init_lora_pair(self.lora_A[name], self.lora_B[name], init_lora_weights, self.r[name])
        if name in self.lora_variant:
            self.lora_variant[name].init(self, name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        variant = self.lora_variant.pop(name, None)
        if variant is not None:
            variant.delete(self, name)
        for table in (self.lora_A, self.lora_B):
            del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self.use_rslora):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- base weights ---------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (a view for Conv1D's [in, out] storage; dequantized for NF4)."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dequantize()
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def base_bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mixed_batch is not None:
            return self.mixed_batch(self, x)
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        if not args and not kwargs:
            y = self._one_adapter_forward(x)
            if y is not None:
                return y
        active = [] if self.disable_adapters else [a for a in self.active_adapters
                                                   if a in self.lora_A and a not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if isinstance(self.base_layer, NF4Linear):
            return qlora_forward(self, x, active)
        weight, bias = self.base_weight(), self.base_bias()
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif x.dtype != weight.dtype:
            raise _dtype_mismatch(x, weight)
        y = None
        for name in active:
            scale = self.scaling[name]
            lora_b = self.lora_B[name]
            term_bias = with_lora_bias(self, name, bias if y is None else None, x.dtype)
            p = self.lora_dropout_p[name] if self.training else 0.0
            variant = self.lora_variant.get(name)
            if variant is not None and y is not None:  # DoRA after other adapters: it rescales their sum
                y = variant.forward_onto(self, name, x, y, weight, bias, p)
                continue
            if variant is not None:
                out = variant.forward(self, name, x, weight if y is None else None, term_bias, p)
            else:
                out = lora_linear(x, weight if y is None else None, term_bias, self.lora_A[name].weight,
                                  lora_b.weight, scale, p)
            y = out if y is None else y + out
        return y

    def _one_adapter_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The usual call (one active plain-LoRA adapter, nothing merged or disabled, a Linear / Conv1D base,
        no autocast) as ``forward``'s loop runs it, or None for anything else. Submodules and parameters are
        read from their dicts: each ``nn.Module.__getattr__`` is a Python call, and a small layer's call made
        about 13 of them (2026-12-01 tiny-Llama profile)."""
        active = self.active_adapters
        if len(active) != 1 or self.disable_adapters or self.merged_adapters:
            return None
        name = active[0]
        modules = self._modules
        lora_a = modules["lora_A"]._modules.get(name)
        base = modules["base_layer"]
        if (lora_a is None or name in self.lora_variant or isinstance(base, NF4Linear)
                or torch.is_autocast_enabled(x.device.type)):
            return None
        weight = _param(base, "weight")
        if self.fan_in_fan_out:
            weight = weight.t()
        if x.dtype != weight.dtype:
            raise _dtype_mismatch(x, weight)
        lora_b = modules["lora_B"]._modules[name]
        bias = _param(base, "bias")
        if _param(lora_b, "bias") is not None:
            bias = with_lora_bias(self, name, bias, x.dtype)
        p = self.lora_dropout_p[name] if self.training else 0.0
        return lora_linear(x, weight, bias, _param(lora_a, "weight"), _param(lora_b, "weight"), self.scaling[name], p)

    # -- merging --------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in fp32, laid out like the stored base weight (zero for a head tied to an embedding adapter,
        nn/weight_tying.py: the embedding's merge already folds that delta into the one shared table)."""
        if name in getattr(self, "tied_adapters", ()):
            return torch.zeros(self.base_layer.weight.shape, dtype=torch.float32, device=self.base_layer.weight.device)
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def _merged_values(self, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weight and bias with these adapters folded in, in fp32 (nothing is written)."""
        quantized = isinstance(self.base_layer, NF4Linear)  # merged into a new full-precision Linear
        merged_w = self._fold_weights(names)  # [out, in]; NF4 (and so DoRA on NF4) is never fan_in_fan_out
        merged_w = merged_w.t() if self.fan_in_fan_out else merged_w
        merged_b = None
        lora_biases = [n for n in names if self.lora_B[n].bias is not None]
        if lora_biases:
            if self.base_layer.bias is None and not quantized:
                raise ValueError("cannot merge lora_bias into a base layer that has no bias")
            b0 = 0.0 if self.base_layer.bias is None else self.base_layer.bias.detach().float()
            merged_b = b0 + sum(
                self.scaling[n] * self.lora_B[n].bias.detach().float() for n in lora_biases)
        return merged_w, merged_b

    def merged_as_stored(self, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What a merge would write: the fp32 merged values rounded once to the base's dtypes. safe_merge
        checks these, not the fp32 values, since an fp16 / bf16 base can overflow in the cast."""
        merged_w, merged_b = self._merged_values(names)
        if isinstance(self.base_layer, NF4Linear):  # merged into a new Linear in the compute dtype
            w_dtype = b_dtype = self.base_layer.compute_dtype
        else:
            w_dtype = self.base_layer.weight.dtype
            b_dtype = w_dtype if self.base_layer.bias is None else self.base_layer.bias.dtype
        return merged_w.to(w_dtype), None if merged_b is None else merged_b.to(b_dtype)

    def _fold_weights(self, names: list[str]) -> torch.Tensor:
        """The current weight [out, in] in fp32 with ``names`` folded in, in order (variants fold their own way)."""
        quantized = isinstance(self.base_layer, NF4Linear)
        w = self.base_layer.dequantize(torch.float32) if quantized else self.base_weight().detach().float()
        for n in names:
            variant = self.lora_variant.get(n)
            w = variant.merge_weight(self, n, w) if variant is not None else w + self._delta_out_in(n)
        return w

    def unmerged_weight_fp32(self) -> torch.Tensor:
        """The base weight [out, in] in fp32 with the merged adapters taken out, last merged first."""
        w = self.base_weight().detach().float()
        for n in reversed(self.merged_adapters):
            variant = self.lora_variant.get(n)
            w = variant.unmerge_weight(self, n, w) if variant is not None else w - self._delta_out_in(n)
        return w

    def _delta_out_in(self, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> list[str]:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        for name in names:
            if name not in self.lora_A:
                raise KeyError(f"unknown adapter {name!r}; this layer has {list(self.lora_A)}")
        if not names:
            return []
        if isinstance(self.base_layer, NF4Linear):
            return merge_quantized(self, names, safe_merge)
        weight = self.base_layer.weight
        merged_w, merged_b = self.merged_as_stored(names)
        if safe_merge and not merge_is_finite(merged_w, merged_b):
            raise ValueError(f"safe_merge: merging adapters {names} gives non-finite weights in "
                             f"{weight.dtype}; nothing was changed")
        with torch.no_grad():
            weight.copy_(merged_w)
            if merged_b is not None:
                self.base_layer.bias.copy_(merged_b)
        self.merged_adapters.extend(names)
        return names

    def unmerge(self) -> None:
        if not self.merged_adapters or unmerge_quantized(self):
            return
        names = list(self.merged_adapters)
        weight = self.base_layer.weight
        with torch.no_grad():
            restored = self.unmerged_weight_fp32()
            weight.copy_((restored.t() if self.fan_in_fan_out else restored).to(weight.dtype))
            lora_biases = [n for n in names if self.lora_B[n].bias is not None]
            if lora_biases:
                bias = self.base_layer.bias
                bias.copy_((bias.float() - sum(self.scaling[n] * self.lora_B[n].bias.float()
                                               for n in lora_biases)).to(bias.dtype))
        self.merged_adapters = []

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" + (f" {self.lora_variant[n].kind}" if n in self.lora_variant else "")
                          for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}]"
