"""LoHaLayer: PEFT's LoHa (peft_type LOHA) on nn.Linear, nn.Conv1d and nn.Conv2d.

Parameters and disk keys are PEFT's: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, K], ``hada_w2_a``,
``hada_w2_b`` (K = in for Linear, (in / groups) * prod(kernel) for a conv); with use_effective_conv2d
on a kernel that is not 1x1, ``hada_t1`` / ``hada_t2`` [r, r, kh, kw] ([r, r, k, 1] for Conv1d) and
``hada_w1_a`` stored as [r, out], ``hada_w1_b`` as [r, in / groups]. Scaling alpha / r.

Forward: ``ops.loha`` (the Khatri-Rao form on the fused LoRA op, dense only where cheaper by its rule);
the effective-conv (CP / Tucker) form as a 1x1 conv, a core conv and a 1x1 conv
(``ops.loha.loha_tucker_conv``, dense only where cheaper by ``use_factored_tucker``). rank_dropout and
module_dropout follow PEFT, in training only, drawing from torch's global CPU generator in PEFT's order
(``torch.rand(1)`` for module_dropout on every training forward, then ``torch.rand(out)`` for the
rank_dropout row mask, kept rows scaled by 1 / mean(mask)), so a seeded run repeats PEFT's masks.
The conv adapter honours the base's padding_mode (PEFT's pads with zeros).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.loha import dense_delta, loha_conv, loha_linear, loha_tucker_conv, tucker_delta
from .adapter_layer import AdapterLayer

LOHA_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _effective(base: nn.Module, use_effective_conv2d: bool) -> bool:
    return bool(use_effective_conv2d) and isinstance(base, (nn.Conv1d, nn.Conv2d)) and \
        any(k != 1 for k in base.kernel_size)


class LoHaLayer(AdapterLayer):
    param_dicts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    fuses_linear = True
    setting_dicts = ("scaling", "r", "alpha", "rank_dropout", "module_dropout")
    form = "auto"  # "factored" / "dense" force one form (tests, benchmarks); "auto" applies ops.loha's rule

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, use_effective_conv2d: bool = False,
                 init_weights: bool = True):
        if type(base_layer) not in LOHA_BASES:
            raise TypeError(f"LoHa wraps nn.Linear, nn.Conv1d or nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        for attr in self.param_dicts:
            setattr(self, attr, nn.ParameterDict())
        self.add_adapter(adapter_name, r, alpha, rank_dropout, module_dropout, use_effective_conv2d, init_weights)
        self.active_adapters = [adapter_name]

    @staticmethod
    def adapter_shapes(base: nn.Module, r: int, use_effective_conv2d: bool = False) -> dict[str, tuple[int, ...]]:
        out = base.weight.shape[0]
        if isinstance(base, nn.Linear):
            k = base.weight.shape[1]
            return {"hada_w1_a": (out, r), "hada_w1_b": (r, k), "hada_w2_a": (out, r), "hada_w2_b": (r, k)}
        in_g = base.in_channels // base.groups
        if _effective(base, use_effective_conv2d):
            kernel = tuple(base.kernel_size) if len(base.kernel_size) == 2 else (base.kernel_size[0], 1)
            return {"hada_t1": (r, r, *kernel), "hada_w1_a": (r, out), "hada_w1_b": (r, in_g),
                    "hada_t2": (r, r, *kernel), "hada_w2_a": (r, out), "hada_w2_b": (r, in_g)}
        k = in_g * math.prod(base.kernel_size)
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, k), "hada_w2_a": (out, r), "hada_w2_b": (r, k)}

    def add_adapter(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                    use_effective_conv2d: bool = False, init_weights: bool = True) -> None:
        self._check_new(name)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        kw = dict(device=self.base_layer.weight.device, dtype=self.adapter_dtype())
        for suffix, shape in self.adapter_shapes(self.base_layer, r, use_effective_conv2d).items():
            getattr(self, suffix)[name] = nn.Parameter(torch.empty(shape, **kw))
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name], self.module_dropout[name] = float(rank_dropout), float(module_dropout)
        with torch.no_grad():
            for suffix, p in self.adapter_tensors(name).items():
                _kaiming(p)
                if suffix == "hada_w2_b" and init_weights:  # PEFT's init: dW = 0 through w2_b = 0
                    nn.init.zeros_(p)

    # -- forward --------------------------------------------------------------------------------
    def linear_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # The base GEMM and the LoHa term in one fused op call.
        base, t = self.base_layer, self.adapter_tensors(name)
        return loha_linear(x, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                           self.scaling[name], self.rank_dropout_rows(name), self.form, base.weight, base.bias)

    def adapter_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.module_dropped(name):
            return None
        t, s, row_scale = self.adapter_tensors(name), self.scaling[name], self.rank_dropout_rows(name)
        base = self.base_layer
        if "hada_t1" in t:
            return loha_tucker_conv(x, base, t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"],
                                    t["hada_w2_a"], t["hada_w2_b"], s, row_scale, self.form)
        factors = (t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])
        if isinstance(base, nn.Linear):
            return loha_linear(x, *factors, s, row_scale, self.form)
        return loha_conv(x, base, *factors, s, row_scale, self.form)

    def delta_weight(self, name: str) -> torch.Tensor:
        t = {k: self.merge_value(v) for k, v in self.adapter_tensors(name).items()}
        if "hada_t1" in t:
            delta = tucker_delta(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"], t["hada_w2_a"],
                                 t["hada_w2_b"])
        else:
            delta = dense_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])
        return delta.reshape(self.base_layer.weight.shape) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names())
        return f"LoHa on {type(self.base_layer).__name__}, adapters=[{ranks}]"
