"""LoKrLayer: PEFT's LoKr (peft_type LOKR) on nn.Linear, nn.Conv1d and nn.Conv2d.

out = a b and in = c d (per group for convs) from ``factorization`` (PEFT's rule). Parameters and disk
keys are PEFT's: ``lokr_w1`` [a, c], or ``lokr_w1_a`` [a, r] / ``lokr_w1_b`` [r, c] with decompose_both
when r < max(a, c) / 2; ``lokr_w2`` [b, d] (conv: [b, d, *kernel]) when r >= max(b, d) / 2, else
``lokr_w2_a`` [b, r] / ``lokr_w2_b`` [r, d] (conv: [r, d * prod(kernel)]); with use_effective_conv2d on a
kernel that is not 1x1, ``lokr_t2`` [r, r, kh, kw] ([r, r, k, 1] for Conv1d) and ``lokr_w2_a`` as [r, b],
``lokr_w2_b`` as [r, d]. Scaling alpha / r, as PEFT, even with both factors full (LyCORIS uses 1 there).

Forward: ``ops.lokr`` (W1 X W2^T on reshaped inputs; the Kronecker product is never built) for Linear
(one adapter: fused with the base GEMM, low-rank factors kept split) and for convs with groups == 1.
Two cases build the dense kernel instead: grouped convs, and Conv1d with a full 3-D ``lokr_w2``,
where PEFT's ``torch.kron`` of a 2-D and a 3-D tensor gives a layout that is not a Kronecker product of
the kernels; lora_triton reproduces that layout so PEFT's files give PEFT's outputs. Conv1d with
use_effective_conv2d works here (PEFT's crashes). rank_dropout / module_dropout as in PEFT (training
only; torch's global CPU generator in PEFT's order; mask / mean only with rank_dropout_scale).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.loha import cp_kernel
from ..ops.lokr import lokr_conv, lokr_linear
from .adapter_layer import AdapterLayer

LOKR_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into (m, n), m <= n: a given factor that divides it, else the divisor
    pair nearest the square root (bounded by ``factor`` when it is positive)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _dims(base: nn.Module, decompose_factor: int):
    out = base.weight.shape[0]
    in_dim = base.in_features if isinstance(base, nn.Linear) else base.in_channels // base.groups
    (a, b), (c, d) = factorization(out, decompose_factor), factorization(in_dim, decompose_factor)
    kernel = () if isinstance(base, nn.Linear) else tuple(base.kernel_size)
    return a, b, c, d, kernel


class LoKrLayer(AdapterLayer):
    param_dicts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    fuses_linear = True
    setting_dicts = ("scaling", "r", "alpha", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, use_effective_conv2d: bool = False,
                 decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False,
                 init_weights=True):
        if type(base_layer) not in LOKR_BASES:
            raise TypeError(f"LoKr wraps nn.Linear, nn.Conv1d or nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        for attr in self.param_dicts:
            setattr(self, attr, nn.ParameterDict())
        self.add_adapter(adapter_name, r, alpha, rank_dropout, module_dropout, use_effective_conv2d, decompose_both,
                         decompose_factor, rank_dropout_scale, init_weights)
        self.active_adapters = [adapter_name]

    @staticmethod
    def adapter_shapes(base: nn.Module, r: int, use_effective_conv2d: bool = False, decompose_both: bool = False,
                       decompose_factor: int = -1) -> dict[str, tuple[int, ...]]:
        a, b, c, d, kernel = _dims(base, decompose_factor)
        shapes: dict[str, tuple[int, ...]] = {}
        if decompose_both and r < max(a, c) / 2:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            shapes["lokr_w1"] = (a, c)
        full_w2 = r >= max(b, d) / 2
        if full_w2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif kernel and use_effective_conv2d and any(k != 1 for k in kernel):
            shapes.update(lokr_t2=(r, r, *(kernel if len(kernel) == 2 else (kernel[0], 1))), lokr_w2_a=(r, b),
                          lokr_w2_b=(r, d))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        return shapes

    def add_adapter(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                    use_effective_conv2d: bool = False, decompose_both: bool = False, decompose_factor: int = -1,
                    rank_dropout_scale: bool = False, init_weights=True) -> None:
        self._check_new(name)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        kw = dict(device=self.base_layer.weight.device, dtype=self.adapter_dtype())
        shapes = self.adapter_shapes(self.base_layer, r, use_effective_conv2d, decompose_both, decompose_factor)
        for suffix, shape in shapes.items():
            getattr(self, suffix)[name] = nn.Parameter(torch.empty(shape, **kw))
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name], self.module_dropout[name] = float(rank_dropout), float(module_dropout)
        self.rank_dropout_scale[name] = bool(rank_dropout_scale)
        # PEFT's inits: True -> w1 (or w1_a) = 0; "lycoris" -> w2 (or w2_b) = 0; False -> all random.
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init_weights, ())
        with torch.no_grad():
            for suffix, p in self.adapter_tensors(name).items():
                nn.init.zeros_(p) if suffix in zero else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    # -- factors --------------------------------------------------------------------------------
    def _factors(self, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [a, c], W2 [b, d] or the kernel factor [b, d, *kernel]): small matrices, never the product."""
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        base = self.base_layer
        if "lokr_w2" in t:
            return w1, t["lokr_w2"]
        if "lokr_t2" in t:
            w2 = cp_kernel(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            return w1, w2.reshape(*w2.shape[:2], *base.kernel_size)
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if not isinstance(base, nn.Linear):
            w2 = w2.reshape(w2.shape[0], -1, *base.kernel_size)
        return w1, w2

    def _peft_conv1d_layout(self, t: dict) -> bool:
        return isinstance(self.base_layer, nn.Conv1d) and "lokr_w2" in t

    def _dense(self, w1: torch.Tensor, w2: torch.Tensor, peft_layout: bool) -> torch.Tensor:
        if not peft_layout:  # the Kronecker product over channels, the kernel taken from w2
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2.contiguous()).reshape(self.base_layer.weight.shape)

    # -- forward --------------------------------------------------------------------------------
    def linear_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # The base GEMM and the LoKr chain in one autograd Function.
        base = self.base_layer
        return lokr_linear(x, *self._linear_factors(self.adapter_tensors(name)), self.scaling[name],
                           self.rank_dropout_rows(name), base.weight, base.bias)

    @staticmethod
    def _linear_factors(t: dict):
        """W1 and W2 of a Linear adapter, each a full matrix or its low-rank pair (kept split)."""
        w1 = t["lokr_w1"] if "lokr_w1" in t else (t["lokr_w1_a"], t["lokr_w1_b"])
        w2 = t["lokr_w2"] if "lokr_w2" in t else (t["lokr_w2_a"], t["lokr_w2_b"])
        return w1, w2

    def rank_dropout_scaled(self, name: str) -> bool:
        return self.rank_dropout_scale[name]

    def adapter_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.module_dropped(name):
            return None
        t, s, row_scale = self.adapter_tensors(name), self.scaling[name], self.rank_dropout_rows(name)
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return lokr_linear(x, *self._linear_factors(t), s, row_scale)
        w1, w2 = self._factors(t)
        if base.groups == 1 and not self._peft_conv1d_layout(t):
            return lokr_conv(x, base, w1, w2, s, row_scale)
        return self.dense_conv_term(x, self._dense(w1, w2, self._peft_conv1d_layout(t)) * s, row_scale)

    def delta_weight(self, name: str) -> torch.Tensor:
        t = {k: self.merge_value(v) for k, v in self.adapter_tensors(name).items()}
        return self._dense(*self._factors(t), self._peft_conv1d_layout(t)) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names())
        return f"LoKr on {type(self.base_layer).__name__}, adapters=[{ranks}]"
