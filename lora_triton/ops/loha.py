"""LoHa without its dense delta: the Hadamard product of two rank-r products is one rank-r^2 product.

dW = (W1a W1b) * (W2a W2b) * s equals P Q * s with the Khatri-Rao (row-wise Kronecker) factors
P [out, r1 r2], P[i, (a, b)] = W1a[i, a] W2a[i, b] and Q [r1 r2, K], Q[(a, b), j] = W1b[a, j] W2b[b, j].
So a LoHa layer is a LoRA of rank r1 r2 and runs on the fused ``lora_linear`` op (Linear) or as a conv
to r1 r2 channels followed by a 1x1 conv (Conv, groups == 1); autograd carries the gradients of P and Q
back to the four factors. P and Q are small (r^2 (out + K) elements) and rebuilt each call.

Form rule (``use_factored``): the factored form costs r^2 (K + out) multiply-adds per output position,
the dense one K out per position plus r K out (twice) to build dW once per call. The dense form is used
only where it is cheaper by that count (a large r relative to the layer, or very few positions).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lora_linear import lora_linear


def khatri_rao(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """(P [out, r1 r2], Q [r1 r2, K]) with P Q = (w1a w1b) * (w2a w2b)."""
    out, r1, r2 = w1a.shape[0], w1a.shape[1], w2a.shape[1]
    p = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(out, r1 * r2)
    q = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(r1 * r2, w1b.shape[1])
    return p, q


def dense_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
    return (w1a @ w1b) * (w2a @ w2b)


def use_factored(rank: int, k: int, out: int, positions: int) -> bool:
    factored = positions * rank * (k + out)
    dense = positions * k * out + 2 * rank * k * out
    return factored < dense


def _check(x_features: int, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> None:
    out, k = w1a.shape[0], w1b.shape[1]
    ok = (w1a.dim() == w1b.dim() == w2a.dim() == w2b.dim() == 2 and w2a.shape[0] == out and w2b.shape[1] == k
          and w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0])
    if not ok:
        raise ValueError(f"LoHa factors must be w1_a [out, r1], w1_b [r1, K], w2_a [out, r2], w2_b [r2, K]; got "
                         f"{tuple(w1a.shape)}, {tuple(w1b.shape)}, {tuple(w2a.shape)}, {tuple(w2b.shape)}")
    if x_features != k:
        raise ValueError(f"LoHa factors expect K={k} input features, the input has {x_features}")


def loha_linear(x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float,
                row_scale: Optional[Tensor] = None, form: str = "auto", weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b + s * x dW^T for x [..., K] (weight / bias None: the LoHa term only), dW never built unless
    the dense form is cheaper. With the base weight the factored form is one fused ``lora_linear`` call
    (base GEMM, low-rank term added in place, one dx GEMM), the dense form one GEMM with W + s dW.

    row_scale [out] multiplies the rows of dW (PEFT's rank_dropout mask). form: "auto" | "factored" | "dense".
    """
    _check(x.shape[-1], w1a, w1b, w2a, w2b)
    rank, k, out = w1a.shape[1] * w2a.shape[1], w1b.shape[1], w1a.shape[0]
    positions = x.numel() // max(k, 1)
    if form == "factored" or form == "auto" and use_factored(rank, k, out, positions):
        p, q = khatri_rao(w1a, w1b, w2a, w2b)
        if row_scale is not None:
            p = p * row_scale.to(p.dtype).unsqueeze(1)
        return lora_linear(x, weight, bias, q, p, scaling)
    delta = dense_delta(w1a, w1b, w2a, w2b) * scaling
    if row_scale is not None:
        delta = delta * row_scale.to(delta.dtype).unsqueeze(1)
    delta = delta.to(x.dtype)
    return torch.nn.functional.linear(x, delta if weight is None else weight + delta, bias)


def loha_conv(x: Tensor, base: torch.nn.Module, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float,
              row_scale: Optional[Tensor] = None, form: str = "auto") -> Tensor:
    """s * conv(x, dW) with the base conv's stride, padding, dilation, padding_mode and groups.

    w1b / w2b are [r, (in / groups) * prod(kernel)]. With groups == 1 the factored form is a conv to
    r1 r2 channels (Q as a kernel) and a 1x1 conv (P); grouped convs use the dense kernel.
    """
    kernel = tuple(base.weight.shape[1:])
    _check(w1b.shape[1], w1a, w1b, w2a, w2b)
    out = w1a.shape[0]
    k = w1b.shape[1]
    if k != int(torch.tensor(kernel).prod()):
        raise ValueError(f"LoHa factors hold K={k} but the conv kernel {tuple(base.weight.shape)} needs "
                         f"{int(torch.tensor(kernel).prod())}")
    rank = w1a.shape[1] * w2a.shape[1]
    positions = x.shape[0] * int(torch.tensor(x.shape[2:]).prod())  # input positions: an upper bound, stride >= 1
    if base.groups == 1 and (form == "factored" or form == "auto" and use_factored(rank, k, out, positions)):
        p, q = khatri_rao(w1a, w1b, w2a, w2b)
        if row_scale is not None:
            p = p * row_scale.to(p.dtype).unsqueeze(1)
        u = base._conv_forward(x, q.reshape(rank, *kernel).to(x.dtype), None)  # [N, r1 r2, *spatial]
        y = (p * scaling).to(x.dtype) @ u.flatten(2)  # the 1x1 conv as one batched matmul
        return y.reshape(u.shape[0], out, *u.shape[2:])
    delta = dense_delta(w1a, w1b, w2a, w2b) * scaling
    if row_scale is not None:
        delta = delta * row_scale.to(delta.dtype).unsqueeze(1)
    return base._conv_forward(x, delta.reshape(base.weight.shape).to(x.dtype), None)
