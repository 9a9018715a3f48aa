"""LoHa without its dense delta: the Hadamard product of two rank-r products is one rank-r^2 product.

dW = (W1a W1b) * (W2a W2b) * s equals P Q * s with the Khatri-Rao (row-wise Kronecker) factors
P [out, r1 r2], P[i, (a, b)] = W1a[i, a] W2a[i, b] and Q [r1 r2, K], Q[(a, b), j] = W1b[a, j] W2b[b, j].
So a LoHa layer is a LoRA of rank r1 r2 and runs on the fused ``lora_linear`` op (Linear) or as a conv
to r1 r2 channels per group followed by a grouped 1x1 conv (Conv); autograd carries the gradients of P
and Q back to the four factors. P and Q are small (r^2 (out + K) elements) and rebuilt each call. The
effective-conv (Tucker) form is a 1x1 conv, a core conv and a 1x1 conv (``loha_tucker_conv``).

Form rule (``use_factored``): the factored form costs r^2 (K G + out) multiply-adds per output position,
the dense one K out per position plus r K out (twice) to build dW once per call. The dense form is used
only where it is cheaper by that count (a large r relative to the layer, or very few positions);
``use_factored_tucker`` is the same count for the Tucker form.
"""

from __future__ import annotations

import math
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


def use_factored(rank: int, k: int, out: int, positions: int, groups: int = 1) -> bool:
    factored = positions * rank * (k * groups + out)
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


def _out_positions(base: torch.nn.Module, x: Tensor) -> int:
    """Output positions of the base conv on x: N times the output spatial size."""
    size = x.shape[0]
    for i, n in enumerate(x.shape[2:]):
        if base.padding == "same":
            size *= n
            continue
        pad = 0 if base.padding == "valid" else 2 * base.padding[i]
        span = base.dilation[i] * (base.kernel_size[i] - 1) + 1
        size *= max((n + pad - span) // base.stride[i] + 1, 0)
    return size


def _mix_channels(w: Tensor, u: Tensor, groups: int) -> Tensor:
    """The 1x1 grouped conv of u [N, G c_in, *sp] by w [G c_out, c_in] (a batched matmul, no padding)."""
    n, sp = u.shape[0], u.shape[2:]
    out = torch.matmul(w.reshape(groups, -1, w.shape[1]), u.reshape(n, groups, w.shape[1], -1))
    return out.reshape(n, -1, *sp)


def _conv_then_mix(x: Tensor, base: torch.nn.Module, kernel: Tensor, p: Tensor, scaling: float,
                   row_scale: Optional[Tensor]) -> Tensor:
    """s * P(conv(x, kernel)) with the base's stride, padding, dilation, padding_mode and groups, where kernel
    [r2, c_in, *k] is shared by every group (repeated G times) and P [out, r2] mixes each group's r2 channels."""
    if row_scale is not None:
        p = p * row_scale.to(p.dtype).unsqueeze(1)
    g = base.groups
    u = base._conv_forward(x, kernel.repeat(g, *([1] * (kernel.dim() - 1))).to(x.dtype), None)  # [N, G r2, ...]
    return _mix_channels((p * scaling).to(x.dtype), u, g)


def loha_conv(x: Tensor, base: torch.nn.Module, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float,
              row_scale: Optional[Tensor] = None, form: str = "auto") -> Tensor:
    """s * conv(x, dW) with the base conv's stride, padding, dilation, padding_mode and groups.

    w1b / w2b are [r, (in / groups) * prod(kernel)]. The factored form is a conv to r1 r2 channels per group
    (Q as a kernel shared by the groups: a grouped conv to G r1 r2 channels) and a grouped 1x1 mix by P.
    """
    kernel = tuple(base.weight.shape[1:])
    _check(w1b.shape[1], w1a, w1b, w2a, w2b)
    out = w1a.shape[0]
    k = w1b.shape[1]
    if k != math.prod(kernel):
        raise ValueError(f"LoHa factors hold K={k} but the conv kernel {tuple(base.weight.shape)} needs "
                         f"{math.prod(kernel)}")
    rank = w1a.shape[1] * w2a.shape[1]
    if form == "factored" or form == "auto" and use_factored(rank, k, out, _out_positions(base, x), base.groups):
        p, q = khatri_rao(w1a, w1b, w2a, w2b)
        return _conv_then_mix(x, base, q.reshape(rank, *kernel), p, scaling, row_scale)
    delta = dense_delta(w1a, w1b, w2a, w2b) * scaling
    if row_scale is not None:
        delta = delta * row_scale.to(delta.dtype).unsqueeze(1)
    return base._conv_forward(x, delta.reshape(base.weight.shape).to(x.dtype), None)


def cp_kernel(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """The Tucker (CP) kernel of the effective-conv form: [out, in, *k] from t [r, r, *k], wa [r, out], wb [r, in]."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def tucker_delta(t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
    """W1 * W2 of LoHa's effective-conv form, dense [out, in / groups, *k] (unscaled): the two Tucker kernels'
    Hadamard product (merging, and ``loha_tucker_conv`` where the dense form is cheaper)."""
    return cp_kernel(t1, w1a, w1b) * cp_kernel(t2, w2a, w2b)


def tucker_core(t1: Tensor, t2: Tensor) -> Tensor:
    """The core [r1 r2, r1 r2, *k] of the Hadamard product of two Tucker kernels: T[(i, i2), (j, j2)] =
    t1[i, j] * t2[i2, j2], position by position."""
    r1, r2 = t1.shape[0], t2.shape[0]
    core = t1[:, None, :, None] * t2[None, :, None, :]
    return core.reshape(r1 * r2, r1 * r2, *t1.shape[2:])


def use_factored_tucker(rank: int, in_g: int, out: int, groups: int, taps: int, in_positions: int,
                        out_positions: int) -> bool:
    """The effective-conv (Tucker) rule: the factored form costs in r^2 multiply-adds per input position
    (Q) plus G r^4 taps + out r^2 per output position (the core conv and P); the dense one out in_g taps
    per output position plus 2 r (out in_g taps) to build the two Tucker kernels."""
    factored = in_positions * in_g * groups * rank + out_positions * (groups * rank * rank * taps + out * rank)
    dense = out_positions * out * in_g * taps + 2 * int(math.isqrt(rank)) * out * in_g * taps
    return factored < dense


def loha_tucker_conv(x: Tensor, base: torch.nn.Module, t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor,
                     w2b: Tensor, scaling: float, row_scale: Optional[Tensor] = None, form: str = "auto") -> Tensor:
    """s * conv(x, W1 * W2) for LoHa's effective-conv form, W_n[p, q] = sum_ij t_n[i, j] w_na[i, p] w_nb[j, q]
    (t [r, r, *k], w_a [r, out], w_b [r, in / groups]), without building W1 * W2 unless cheaper: a 1x1 conv
    by Q (in -> r1 r2 per group), the core (``tucker_core``) as a k x k conv with the base's stride,
    padding, dilation and padding_mode, a 1x1 conv by P (r1 r2 -> out): the Khatri-Rao factors of the
    Tucker factors, as for the plain form. The 1x1 conv commutes with every padding mode (no bias)."""
    g, taps = base.groups, math.prod(base.kernel_size)
    out, in_g = w1a.shape[1], w1b.shape[1]
    if (t1.shape[:2] != (w1a.shape[0], w1b.shape[0]) or t2.shape[:2] != (w2a.shape[0], w2b.shape[0])
            or w2a.shape[1] != out or w2b.shape[1] != in_g or math.prod(t1.shape[2:]) != taps):
        raise ValueError(f"LoHa effective-conv factors must be t [r, r, *k], w_a [r, out], w_b [r, in / groups] for "
                         f"the kernel {tuple(base.weight.shape)}; got {tuple(t1.shape)}, {tuple(w1a.shape)}, "
                         f"{tuple(w1b.shape)}, {tuple(t2.shape)}, {tuple(w2a.shape)}, {tuple(w2b.shape)}")
    rank = w1a.shape[0] * w2a.shape[0]
    in_positions = x.shape[0] * math.prod(x.shape[2:])
    if form == "factored" or form == "auto" and use_factored_tucker(rank, in_g, out, g, taps, in_positions,
                                                                    _out_positions(base, x)):
        p, q = khatri_rao(w1a.t(), w1b, w2a.t(), w2b)  # [out, r1 r2], [r1 r2, in / groups]
        u = _mix_channels(q.repeat(g, 1).to(x.dtype), x, g)  # [N, G r1 r2, *spatial]
        return _conv_then_mix(u, base, tucker_core(t1, t2).reshape(rank, rank, *base.kernel_size), p, scaling,
                              row_scale)
    delta = tucker_delta(t1, w1a, w1b, t2, w2a, w2b).reshape(base.weight.shape) * scaling
    if row_scale is not None:
        delta = delta * row_scale.to(delta.dtype).reshape(-1, *([1] * (delta.dim() - 1)))
    return base._conv_forward(x, delta.to(x.dtype), None)
