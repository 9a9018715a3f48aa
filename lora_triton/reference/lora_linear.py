"""Pure-PyTorch twin of the fused LoRA training kernels (``kernels/lora_linear.py``).

Shapes (row-major, as PyTorch stores them): x [M, K], weight [N, K] or None (LoRA
term only), bias [N] or None, lora_A [r, K], lora_B [N, r], all in x's dtype;
seed is an int64 tensor [1] on x's device, or None when dropout_p == 0.
Forward returns y [M, N] and U = D(x) A^T [M, r] (unscaled; kept for backward).
Backward regenerates the dropout mask from the seed (a small CPU mask drawn in forward is kept for it,
``mask_memo``); it never needs D(x) saved.
dA and dB come back in float32; dx in x's dtype.
"""

from __future__ import annotations

import itertools

import torch

from .mask_memo import small_mask
from .philox import few_threads, keep_mask_chunks, serial_cpu


def _f32(t):
    return t if t.dtype == torch.float32 else t.float()  # fp32 already: no dispatch for a no-op cast


def _mask_chunks(x, seed, dropout_p: float):
    """Row chunks (r0, r1, keep) of x's mask, 0/1 in x's dtype (no [M, K] mask or D(x) is built). Only for a
    mask ``small_mask`` does not keep: a small CPU one is kept for the backward there, never here."""
    return keep_mask_chunks(seed, x.shape[0], x.shape[1], dropout_p, device=x.device, dtype=x.dtype)


def _split_first(chunks):
    """(the first chunk or None, an iterator of all the chunks): the callers test whether the mask came
    in one chunk before choosing their loop."""
    first = next(chunks, None)
    return first, itertools.chain(() if first is None else (first,), chunks)


def shrink_dropout(x, lora_A, dropout_p: float, seed):
    """U = D(x) A^T [M, r]: x masked one row chunk at a time into a reused buffer, then one GEMM per chunk
    (a mask that comes in one chunk, as small layers' do, takes the plain ops: fewer calls, same bits)."""
    a_t = lora_A.t()
    keep = small_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, x.dtype, forward=True)
    with serial_cpu(x.device, x.numel()):
        if keep is None:  # not a small CPU mask (that one is kept for this call's backward): the chunks
            first, chunks = _split_first(_mask_chunks(x, seed, dropout_p))
            if first is not None and first[1] - first[0] == x.shape[0]:
                keep = first[2]
        if keep is not None:  # the mask in one chunk
            return torch.mm(x * keep, a_t).mul_(1.0 / (1.0 - dropout_p))
        # K = 0 yields no mask chunk, so nothing would write u: start from zeros there (U = 0 exactly).
        alloc = torch.zeros if first is None else torch.empty
        u = alloc((x.shape[0], lora_A.shape[0]), dtype=x.dtype, device=x.device)
        buf = None
        for r0, r1, keep in chunks:
            if buf is None:
                buf = torch.empty((r1 - r0, x.shape[1]), dtype=x.dtype, device=x.device)
            xm = torch.mul(x[r0:r1], keep, out=buf[:r1 - r0])
            torch.mm(xm, a_t, out=u[r0:r1])
    return u.mul_(1.0 / (1.0 - dropout_p))  # on [M, r], not on [M, K]


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    if dropout_p == 0.0:
        with few_threads(x.device, x.numel()):
            u = x @ lora_A.t()
    else:
        u = shrink_dropout(x, lora_A, dropout_p, seed)
    return base_plus_expand(x, weight, bias, u, lora_B, scaling), u


def base_plus_expand(x, weight, bias, u, lora_B, scaling: float):
    """y = x W^T + b + s U B^T: the rank-r term (and b) written first on few threads, then the base GEMM
    accumulates into it in place (beta = 1: no second pass over [M, N])."""
    sb = lora_B.t() * scaling  # [r, N], tiny
    with few_threads(x.device, x.shape[0] * lora_B.shape[0]):
        y = torch.mm(u, sb) if bias is None else torch.addmm(bias, u, sb)
    return y if weight is None else y.addmm_(x, weight.t())


def _rank_grads(dy, u, lora_B, scaling: float):
    """dU = s dy B [M, r] and dB = s dy^T U [N, r]: two passes over dy on few threads (u^T dy, not
    dy^T u: the transposed-A GEMM is about 2x slower on one thread)."""
    d_u = torch.mm(dy, lora_B).mul_(scaling)
    d_b = torch.mm(u.t(), dy).mul_(scaling).t().contiguous()
    return d_u, d_b


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed,
                    need_dx: bool = True):
    """Returns (dx or None, dA [r, K] float32, dB [N, r] float32).

    Matmuls run in x's dtype (torch accumulates in fp32 inside them), as the kernels do. The rank-r
    GEMMs run on few threads (``few_threads``); dx = dU A is written first and the dgrad GEMM dy W
    accumulates into it in place.
    """
    if dropout_p == 0.0:
        with few_threads(x.device, max(dy.numel(), x.numel())):
            d_u, d_b = _rank_grads(dy, u, lora_B, scaling)
            d_a = d_u.t() @ x
            dx = d_u @ lora_A if need_dx else None
        if dx is not None and weight is not None:
            dx.addmm_(dy, weight)
        return dx, _f32(d_a), _f32(d_b)
    # One mask regeneration per row chunk serves both D(x) for dA and D'(dU A) for dx; the 1/(1-p)
    # scale goes on the rank-r operand, so each [M, K] chunk takes a single masking pass.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    same = x.dtype == acc
    keep = small_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, x.dtype, forward=False)
    with serial_cpu(x.device, max(x.numel(), dy.numel())):
        d_u, d_b = _rank_grads(dy, u, lora_B, scaling)
        d_us = d_u.mul_(1.0 / (1.0 - dropout_p))
        if keep is not None:  # a small CPU mask (the forward's, or regenerated): the mask's single chunk
            first = (0, x.shape[0], keep)
            chunks = iter((first,))
        else:
            first, chunks = _split_first(_mask_chunks(x, seed, dropout_p))
        if same and first is not None and first[1] - first[0] == x.shape[0]:  # fp16 / bf16 accumulate below
            return _bwd_one_chunk(dy, x, weight, lora_A, d_us, d_b, first[2], need_dx)
        dx = None
        if need_dx:
            dx = dy @ weight if weight is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        d_a = torch.zeros((lora_A.shape[0], x.shape[1]), dtype=acc, device=x.device)
        xbuf = dbuf = None
        for r0, r1, keep in chunks:
            n = r1 - r0
            if xbuf is None:
                xbuf = torch.empty((n, x.shape[1]), dtype=x.dtype, device=x.device)
                dbuf = torch.empty((n, x.shape[1]), dtype=x.dtype, device=x.device) if need_dx else None
            xm = torch.mul(x[r0:r1], keep, out=xbuf[:n])
            if same:
                d_a.addmm_(d_us[r0:r1].t(), xm)
            else:  # accumulate the chunks in fp32, not in x's dtype
                d_a += (d_us[r0:r1].t() @ xm).to(acc)
            if need_dx:
                lora_dx = torch.mm(d_us[r0:r1], lora_A, out=dbuf[:n])
                if weight is None:
                    torch.mul(lora_dx, keep, out=dx[r0:r1])
                else:
                    dx[r0:r1].addcmul_(lora_dx, keep)
    return dx, _f32(d_a), _f32(d_b)


def _bwd_one_chunk(dy, x, weight, lora_A, d_us, d_b, keep, need_dx: bool):
    """The p > 0 backward for a mask that comes in one chunk (x in fp32/fp64): whole-tensor ops, no
    buffers or accumulator to set up (a small layer's call pays per op). dx = D'(dU A) is written first
    and the dgrad GEMM accumulates into it."""
    d_a = d_us.t() @ (x * keep)
    dx = None
    if need_dx:
        dx = torch.mm(d_us, lora_A).mul_(keep)
        if weight is not None:
            dx.addmm_(dy, weight)
    return dx, _f32(d_a), _f32(d_b)
