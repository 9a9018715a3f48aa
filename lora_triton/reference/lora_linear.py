"""Pure-PyTorch twin of the fused LoRA training kernels (``kernels/lora_linear.py``).

Shapes (row-major, as PyTorch stores them): x [M, K], weight [N, K] or None (LoRA
term only), bias [N] or None, lora_A [r, K], lora_B [N, r], all in x's dtype;
seed is an int64 tensor [1] on x's device, or None when dropout_p == 0.
Forward returns y [M, N] and U = D(x) A^T [M, r] (unscaled; kept for backward).
Backward regenerates the dropout mask from the seed; it never needs D(x) saved.
dA and dB come back in float32; dx in x's dtype.
"""

from __future__ import annotations

import torch

from .philox import dropout_keep_mask


def _masked(x, seed, dropout_p: float):
    """(x * keep, 1 / (1 - p)): D(x) with its scale left for the rank-r side, one [M, K] pass."""
    if dropout_p == 0.0:
        return x, None
    return x * dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device), 1.0 / (1.0 - dropout_p)


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    xm, inv_keep = _masked(x, seed, dropout_p)
    u = xm @ lora_A.t()
    if inv_keep is not None:
        u *= inv_keep  # on [M, r], not on [M, K]
    return base_plus_expand(x, weight, bias, u, lora_B, scaling), u


def base_plus_expand(x, weight, bias, u, lora_B, scaling: float):
    """y = x W^T + b + s U B^T, the low-rank term added in place (no second [M, N] buffer)."""
    if weight is None:
        y = torch.zeros((x.shape[0], lora_B.shape[0]), dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias
    elif bias is None:
        y = x @ weight.t()
    else:
        y = torch.addmm(bias, x, weight.t())
    return y.addmm_(u, lora_B.t(), alpha=scaling)


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed,
                    need_dx: bool = True):
    """Returns (dx or None, dA [r, K] float32, dB [N, r] float32).

    Matmuls run in x's dtype (torch accumulates in fp32 inside them), as the kernels do.
    """
    d_b = (dy.t() @ u) * scaling
    d_u = (dy @ lora_B) * scaling
    # One mask regeneration serves both D(x) for dA and D'(dU A) for dx; the 1/(1-p) scale
    # goes on the rank-r operand, so each [M, K] tensor takes a single masking pass.
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device) if dropout_p > 0.0 else None
    d_us = d_u if keep is None else d_u * (1.0 / (1.0 - dropout_p))
    d_a = d_us.t() @ (x if keep is None else x * keep)
    dx = None
    if need_dx:
        lora_dx = d_us @ lora_A
        if keep is not None:
            lora_dx.mul_(keep)
        dx = lora_dx if weight is None else torch.addmm(lora_dx, dy, weight)
    return dx, d_a.float(), d_b.float()
