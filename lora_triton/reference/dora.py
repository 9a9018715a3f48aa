"""Pure-PyTorch twin of the DoRA kernels (``kernels/dora.py``): the factored weight norm and the
DoRA linear forward / backward. Never imports triton.

DoRA (PEFT's semantics, REFERENCE.md §5), with g = m / n and n = ||W + s B A||_2 per output row
(detached):
  p = 0 (or eval):  y = g * (x W^T + s U B^T) + b,              U = x A^T
  p > 0 (training): y = x W^T + b + (g - 1) * (D(x) W^T) + g * s U B^T,   U = D(x) A^T
y_pre = W D(x) + s U B^T (D = identity at p = 0) is what the gradient of m needs:
dm_j = sum_t dy_tj * y_pre_tj / n_j. It is the one [M, N] tensor kept for backward.

Shapes: x [M, K]; weight [N, K] (may be a transposed view); bias [N] or None; lora_A [r, K];
lora_B [N, r] (all in x's dtype); magnitude [N] (any float dtype); weight_norm [N] float32;
weight_sq [N] float32 (||W_i||^2, cached by the caller per frozen weight).
"""

from __future__ import annotations

import torch

from .lora_linear import base_plus_expand
from .philox import keep_mask_chunks

# Rows of a half-precision W upcast at a time for the norm terms: bounds the fp32 temporary
# (never a full [N, K] copy) while keeping each matmul large enough to run at speed.
_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(weight: torch.Tensor):
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start:start + rows].float()


def dora_weight_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 per output row, float32 [N]; computed once per frozen weight."""
    if weight.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(weight, dim=1).float().square()
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start, chunk in _row_chunks(weight):
        out[start:start + chunk.shape[0]] = torch.linalg.vector_norm(chunk, dim=1).square()
    return out


def _weight_times_a(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W A^T [N, r] in float32 (W read once; a half W is upcast row-chunk by row-chunk)."""
    a_t = lora_A.float().t()
    if weight.dtype == torch.float32:
        return weight @ a_t
    if weight.dtype == torch.float64:
        return (weight @ a_t.double()).float()
    out = torch.empty((weight.shape[0], lora_A.shape[0]), dtype=torch.float32, device=weight.device)
    for start, chunk in _row_chunks(weight):
        out[start:start + chunk.shape[0]] = chunk @ a_t
    return out


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_sq: torch.Tensor) -> torch.Tensor:
    """n = ||W + s B A||_2 per output row, float32 [N], without forming W + s B A:
    n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T. Cost: one read of W (N K r)."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return norm_from_products(weight_sq, _weight_times_a(weight, lora_A).to(wide), lora_A.to(wide),
                              lora_B.to(wide), scaling)


def norm_from_products(weight_sq: torch.Tensor, wa: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """n from ||W_i||^2 [N], W A^T [N, r] and the factors (all in one wide dtype): the part of the factored
    norm that never touches W, shared by the dense path and the 4-bit one (W dequantized a chunk at a time)."""
    wide, a, b = wa.dtype, lora_A, lora_B
    gram = a @ a.t()  # [r, r]
    cross = (wa * b).sum(1)
    quad = ((b @ gram) * b).sum(1)
    sq = weight_sq.to(wide) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    # The squared norm is a sum of squares; rounding can push a (near-)zero row slightly negative.
    return sq.clamp_min(0.0).sqrt().float()


def dora_scales(magnitude: torch.Tensor, weight_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, g - 1) in float32, with g - 1 = (m - n) / n: no cancellation when m / n is close to 1."""
    m = magnitude.float()
    return m / weight_norm, (m - weight_norm) / weight_norm


def dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling: float, dropout_p: float,
                    seed):
    """Returns (y [M, N], u [M, r] unscaled, y_pre [M, N]), all in x's dtype."""
    g, gm1 = dora_scales(magnitude, weight_norm)
    gm1 = gm1.to(x.dtype)
    if dropout_p == 0.0:
        u = x @ lora_A.t()
        y_pre = base_plus_expand(x, weight, None, u, lora_B, scaling)
        # y = y_pre + (g - 1) y_pre: the small factor multiplies, g itself is never rounded to x's dtype.
        y = torch.addcmul(y_pre, y_pre, gm1)
        if bias is not None:
            y += bias
        return y, u, y_pre
    xd = _masked_copy(x, seed, dropout_p)  # D(x) = xd / (1 - p); the scale goes on the rank-r and [M, N] sides
    inv_keep = 1.0 / (1.0 - dropout_p)
    u = (xd @ lora_A.t()).mul_(inv_keep)
    # PEFT's form: base(x) + (g - 1) W D(x) + g s U B^T = base(x) + (g - 1) y_pre + s U B^T.
    y_pre = torch.mm(xd, weight.t()).mul_(inv_keep).addmm_(u, lora_B.t(), alpha=scaling)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    y.addcmul_(y_pre, gm1).addmm_(u, lora_B.t(), alpha=scaling)
    return y, u, y_pre


def dora_linear_bwd(dy, x, weight, lora_A, lora_B, magnitude, weight_norm, u, y_pre, scaling: float,
                    dropout_p: float, seed, need_dx: bool = True):
    """Returns (dx or None, dA [r, K] float32, dB [N, r] float32, dm [N] float32).

    dy enters the LoRA side scaled by g (d y / d(s U B^T) = g) and, with dropout, the second base
    GEMM's path by g - 1; dm = sum_t dy * y_pre / n is one column reduction over [M, N].
    """
    g, gm1 = dora_scales(magnitude, weight_norm)
    d_m = torch.mul(dy, y_pre).sum(0, dtype=torch.float32) / weight_norm
    # g scales rows of B and of dB ([N, r]) rather than dy ([M, N]) on the rank-r side.
    d_b = (dy.t() @ u).float() * (scaling * g)[:, None]
    d_u = dy @ (lora_B * (scaling * g).to(lora_B.dtype)[:, None])
    if dropout_p == 0.0:
        d_a = d_u.t() @ x
        dx = torch.addmm(d_u @ lora_A, dy * g.to(dy.dtype), weight) if need_dx else None
        return dx, d_a.float(), d_b, d_m
    inv_keep = 1.0 / (1.0 - dropout_p)
    d_us = d_u * inv_keep
    dropped = None
    if need_dx:
        # dx = dy W + D'((g - 1) dy W + dU A): the mask chunks that rebuild D(x) for dA also mask this.
        dropped = (dy * (gm1 * inv_keep).to(dy.dtype)) @ weight
        dropped.addmm_(d_us, lora_A)
    xd = _masked_copy(x, seed, dropout_p, also=dropped)
    d_a = d_us.t() @ xd
    del xd
    dx = dropped.addmm_(dy, weight) if need_dx else None
    return dx, d_a.float(), d_b, d_m


def _masked_copy(x, seed, dropout_p: float, also=None):
    """x * keep (not yet divided by 1 - p) as a temporary of x's size, built from row chunks of the mask
    (no [M, K] mask is held); ``also`` [M, K] is multiplied by the same mask in place. Nothing of this is
    saved for backward: the backward regenerates it from the seed."""
    out = torch.empty_like(x) if x.shape[1] else torch.zeros_like(x)
    for r0, r1, keep in keep_mask_chunks(seed, x.shape[0], x.shape[1], dropout_p, device=x.device, dtype=x.dtype):
        torch.mul(x[r0:r1], keep, out=out[r0:r1])
        if also is not None:
            also[r0:r1].mul_(keep)
    return out
