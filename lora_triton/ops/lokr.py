"""LoKr without the Kronecker product: kron(W1, W2) x = vec(W1 X W2^T) on x reshaped to X [c, d].

With dW[(i, j), (k, l)] = W1[i, k] W2[j, l] (W1 [a, c], W2 [b, d], out = a b, in = c d) the layer term
is Y[m] = W1 X[m] W2^T: two small matmuls per row, never the [out, in] product. The Linear form is an
autograd Function that saves only x and the two factors (the intermediate X W2^T is recomputed in
backward), so training keeps no dense delta and no extra activation. For a conv, W2 is a kernel
[b, d, *k]: X is viewed as c groups of d channels, convolved with W2 by the base's stride, padding,
dilation and padding_mode, then mixed over c by W1. Low-rank factors (w1_a w1_b, w2_a w2_b) are
multiplied out first: they are only [a, c] / [b, d] (times the kernel), the small matrices.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class _KronLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        m, (a, c), (b, d) = x2.shape[0], w1.shape, w2.shape
        t = x2.view(m, c, d) @ w2.t()  # [M, c, b]
        y = torch.matmul(w1, t)  # [M, a, b]
        ctx.save_for_backward(x2, w1, w2)
        return y.reshape(m, a * b)

    @staticmethod
    def backward(ctx, dy: Tensor):
        # Every contraction as one large GEMM over (rows x group) instead of M tiny batched ones.
        x2, w1, w2 = ctx.saved_tensors
        m, (a, c), (b, d) = x2.shape[0], w1.shape, w2.shape
        dy3 = dy.reshape(m, a, b)
        dt = torch.matmul(w1.t(), dy3).reshape(m * c, b)  # dL/d(X W2^T)
        d_w1 = d_w2 = d_x = None
        if ctx.needs_input_grad[1]:
            t = (x2.reshape(m * c, d) @ w2.t()).view(m, c, b)  # recomputed, never saved
            d_w1 = dy3.transpose(0, 1).reshape(a, m * b) @ t.transpose(0, 1).reshape(c, m * b).t()
        if ctx.needs_input_grad[2]:
            d_w2 = dt.t() @ x2.reshape(m * c, d)
        if ctx.needs_input_grad[0]:
            d_x = (dt @ w2).reshape(m, c * d)
        return d_x, d_w1, d_w2


def _check_factors(w1: Tensor, w2: Tensor, out: int, k: int) -> None:
    if w1.dim() != 2 or w2.dim() < 2:
        raise ValueError(f"LoKr factors must be w1 [a, c] and w2 [b, d, ...], got {tuple(w1.shape)}, {tuple(w2.shape)}")
    if w1.shape[0] * w2.shape[0] != out or w1.shape[1] * w2.shape[1] != k:
        raise ValueError(f"LoKr factors w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} do not factor this layer: "
                         f"need a*b = out ({out}) and c*d = in ({k})")


def lokr_linear(x: Tensor, w1: Tensor, w2: Tensor, scaling: float, row_scale: Optional[Tensor] = None) -> Tensor:
    """s * x kron(w1, w2)^T for x [..., c d]; row_scale [a b] multiplies the output features (rank_dropout)."""
    out, k = w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]
    _check_factors(w1, w2, out, x.shape[-1])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = _KronLinear.apply(x2, (w1 * scaling).to(x.dtype), w2.to(x.dtype))
    if row_scale is not None:
        y = y * row_scale.to(y.dtype)
    return y.reshape(*lead, out)


def lokr_conv(x: Tensor, base: torch.nn.Module, w1: Tensor, w2: Tensor, scaling: float,
              row_scale: Optional[Tensor] = None) -> Tensor:
    """s * conv(x, kron(w1, w2)) for a base conv with groups == 1; w2 is the kernel factor [b, d, *k]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    _check_factors(w1, w2, base.out_channels, base.in_channels)
    if tuple(w2.shape[2:]) != tuple(base.kernel_size):
        raise ValueError(f"LoKr kernel factor {tuple(w2.shape)} does not match the conv kernel {base.kernel_size}")
    n, spatial = x.shape[0], x.shape[2:]
    xg = x.reshape(n * c, d, *spatial)  # channel (k, l) = k d + l: c groups of d channels
    t = base._conv_forward(xg, w2.to(x.dtype), None)  # [N c, b, *out spatial]
    out_spatial = t.shape[2:]
    y = (w1 * scaling).to(x.dtype) @ t.reshape(n, c, -1)  # mixes the c groups: [N, a, b * out spatial]
    y = y.reshape(n, a * b, *out_spatial)
    if row_scale is not None:
        y = y * row_scale.to(y.dtype).reshape(-1, *([1] * len(out_spatial)))
    return y
