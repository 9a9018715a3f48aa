"""Fused 4-bit GEMMs: W is dequantized tile by tile inside the K-loop, never materialized.

Same functions and signatures as ``reference/nf4.py``'s twin:
``nf4_linear_fwd(x, weight, bias, u, lora_B, scaling)`` -> y = x deq(W)^T + b + s U B^T and
``nf4_linear_dgrad(dy, weight, d_u, lora_A)`` -> dx = dy deq(W) + dU A.

A W element (n, k) is flat index f = n*K + k of bitsandbytes' layout: byte f // 2 (high nibble when f is
even), code table entry of the nibble, times absmax[f // BLOCKSIZE]; with double quant that absmax is
decoded on the fly as code2[q] * absmax2[(f // BLOCKSIZE) // 256] + offset. The products are formed in
fp32 and rounded once to the compute dtype (bitsandbytes' dequantization, bit for bit), then fed to
tl.dot. The 16 code values sit in registers (``tl.gather``). When K is a multiple of the blocksize and
the tile does not cross a block (K_ALIGNED), one absmax is decoded per W row of the tile; otherwise
blocks may straddle rows and the absmax is gathered per element from flat indices.
With K_ALIGNED and a tile spanning several blocks, one absmax per block is decoded and broadcast.
The LoRA expand is one more [BM, r] x [r, BN] dot before the epilogue (forward); in dgrad the dU A term
is r more columns of the reduction.

Decode (forward with M <= ``GEMV_MAX_M`` = 16): ``_nf4_gemv_kernel``, a split-K GEMV. Each program owns
a [64 rows of W, K / SPLIT_K] slab and all M rows of x (padded to 16 for tl.dot), so the packed weight is
read from memory exactly once; with K even each byte is loaded once and both nibbles decoded
(``tl.interleave``). fp32 partials go to a [SPLIT_K, M, N] workspace (split 0 adds bias and LoRA expand),
summed in split order by ``_splitk_sum_kernel``: deterministic, no atomics. The reference twin is the same
chunked ``reference/nf4.nf4_linear_fwd``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import autotune as at
from .lora_fwd import _dot, _grouped_pid, _lora_acc, _lora_dot
from .lora_linear import _r_pad

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_R = 256


def _empty(shape, dtype, device):
    # Single allocation point for outputs: tests patch it to NaN-fill and check every element is written.
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _absmax(blk, ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, NESTED: tl.constexpr):
    """fp32 absmax of 4-bit blocks ``blk`` (any shape); double quant decoded as code2[q] * absmax2 + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + q, mask=ok, other=0.0) * tl.load(nabs_ptr + (blk >> 8), mask=ok, other=0.0)
        return scale + offset
    else:
        return tl.load(absmax_ptr + blk, mask=ok, other=0.0)


@triton.jit
def _lookup(table, nib):
    """fp32 code values of the nibbles ``nib`` [A, B] in the 16-entry ``table`` held in registers
    (tl.gather), not in memory."""
    A: tl.constexpr = nib.shape[0]
    B: tl.constexpr = nib.shape[1]
    return tl.reshape(tl.gather(table, tl.reshape(nib, (A * B,)), 0), (A, B))


@triton.jit
def _codes(flat, ok, packed_ptr, table):
    """fp32 code values at flat indices ``flat`` [A, B]: byte f // 2, high nibble for even f."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=ok, other=0).to(tl.int32)
    return _lookup(table, tl.where((flat & 1) == 0, byte >> 4, byte & 15))


@triton.jit
def _tile_scale(row_base, row_ok, c0, flat, w_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, K,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, K_ALIGNED: tl.constexpr, COLS: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """absmax of a W tile whose rows start at flat ``row_base`` [ROWS] and whose columns are c0 + [0, COLS)
    (c0 a multiple of COLS), laid out [ROWS, COLS] (or [COLS, ROWS] when TRANSPOSED, the forward's deq(W)^T
    tile): a broadcastable [ROWS, 1] when the tile sits in one block per row, else the full tile."""
    ROWS: tl.constexpr = row_base.shape[0]
    if K_ALIGNED and BLOCKSIZE % COLS == 0:  # one absmax per W row of the tile
        s = _absmax((row_base + c0) // BLOCKSIZE, row_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, NESTED)
        if TRANSPOSED:
            return s[None, :]
        else:
            return s[:, None]
    else:
        if K_ALIGNED and COLS % BLOCKSIZE == 0:  # COLS / BLOCKSIZE absmaxes per W row, decoded and broadcast
            NB: tl.constexpr = COLS // BLOCKSIZE
            sub = c0 // BLOCKSIZE + tl.arange(0, NB)
            if TRANSPOSED:
                blk = (row_base // BLOCKSIZE)[None, :] + sub[:, None]
                s_nb = _absmax(blk, (sub[:, None] * BLOCKSIZE < K) & row_ok[None, :], absmax_ptr, nabs_ptr,
                               ncode_ptr, offset, NESTED)  # [NB, ROWS]
                return tl.reshape(tl.broadcast_to(s_nb[:, None, :], (NB, BLOCKSIZE, ROWS)), (COLS, ROWS))
            else:
                blk = (row_base // BLOCKSIZE)[:, None] + sub[None, :]
                s_nb = _absmax(blk, row_ok[:, None] & (sub[None, :] * BLOCKSIZE < K), absmax_ptr, nabs_ptr,
                               ncode_ptr, offset, NESTED)  # [ROWS, NB]
                return tl.reshape(tl.broadcast_to(s_nb[:, :, None], (ROWS, NB, BLOCKSIZE)), (ROWS, COLS))
        else:  # blocks straddle rows: gathered per element
            return _absmax(flat // BLOCKSIZE, w_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, NESTED)


@triton.jit
def _nf4_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, bias_ptr, u_ptr, lb_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_ym, stride_yn,
    offset, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    col_base = cols.to(tl.int64) * K
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & col_ok[None, :]
        flat = col_base[None, :] + ks[:, None]  # [BK, BN]: the tile of deq(W)^T
        vals = _codes(flat, w_ok, packed_ptr, table)
        scale = _tile_scale(col_base, col_ok, k0, flat, w_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, K, BLOCKSIZE,
                            NESTED, K_ALIGNED, BLOCK_K, True)
        acc = _dot(x, (vals * scale).to(x_ptr.dtype.element_ty), acc, IEEE)
    if HAS_LORA:  # its own fp32 accumulator, scaled once (the tile helpers of lora_fwd)
        acc += scaling * _lora_dot(u_ptr, lb_ptr, rows, cols, row_ok, col_ok, R, stride_um, stride_ur, stride_br,
                                   stride_bn, BLOCK_M, BLOCK_N, R_PAD, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _nf4_dgrad_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, du_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_dum, stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
    offset,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, K_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile [BLOCK_M, BLOCK_N] of dx [M, K]; the reduction runs over W's rows in steps of BLOCK_K.
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kcols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    kc_ok = kcols < K
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & kc_ok[None, :]
        row_base = ns.to(tl.int64) * K
        flat = row_base[:, None] + kcols[None, :]  # [BK, BN]: rows ns of deq(W)
        vals = _codes(flat, w_ok, packed_ptr, table)
        scale = _tile_scale(row_base, n_ok, pid_k * BLOCK_N, flat, w_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, K,
                            BLOCKSIZE, NESTED, K_ALIGNED, BLOCK_N, False)
        acc = _dot(dy, (vals * scale).to(dy_ptr.dtype.element_ty), acc, IEEE)
    if HAS_LORA:  # dU A: r more columns of the reduction, into the main accumulator
        acc = _lora_acc(acc, du_ptr, a_ptr, rows, kcols, row_ok, kc_ok, R, stride_dum, stride_dur, stride_ar,
                        stride_ak, 1.0, R_PAD, IEEE, False)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + kcols[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & kc_ok[None, :])


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, bias_ptr, u_ptr, lb_ptr, ws_ptr,
    M, N, K, R, SPLIT_K,
    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br,
    offset, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, K_ALIGNED: tl.constexpr, K_EVEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Decode (M <= BLOCK_M): program (n tile, K split) reads its [BLOCK_N, K / SPLIT_K] slab of packed W once,
    # all M rows of x at a time, and writes an fp32 partial [M, BLOCK_N] to ws[split]; split 0 adds the bias
    # and the LoRA expand. _splitk_sum_kernel adds the partials up in a fixed order (deterministic).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    row_base = ns.to(tl.int64) * K
    table = tl.load(code_ptr + tl.arange(0, 16))
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        flat = row_base[:, None] + ks[None, :]  # [BN, BK]: rows ns of W
        if K_EVEN:  # a byte holds two neighbours of one row: loaded once, both nibbles decoded
            HALF: tl.constexpr = BLOCK_K // 2
            js = tl.arange(0, HALF)
            b_ok = n_ok[:, None] & ((k0 + 2 * js) < k_hi)[None, :]
            byte = tl.load(packed_ptr + ((row_base + k0) >> 1)[:, None] + js[None, :], mask=b_ok, other=0).to(tl.int32)
            vals = tl.interleave(_lookup(table, byte >> 4), _lookup(table, byte & 15))
        else:  # odd K: rows start mid-byte
            vals = _codes(flat, w_ok, packed_ptr, table)
        scale = _tile_scale(row_base, n_ok, k0, flat, w_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, K, BLOCKSIZE,
                            NESTED, K_ALIGNED, BLOCK_K, False)
        acc = _dot(x, tl.trans((vals * scale).to(x_ptr.dtype.element_ty)), acc, IEEE)
    if pid_s == 0:
        if HAS_LORA:
            acc += scaling * _lora_dot(u_ptr, lb_ptr, ms, ns, m_ok, n_ok, R, stride_um, stride_ur, stride_br,
                                       stride_bn, BLOCK_M, BLOCK_N, R_PAD, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(ws_ptr + (pid_s * M + ms[:, None]) * N + ns[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_sum_kernel(ws_ptr, y_ptr, MN, SPLIT_K, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# Decode path: chosen by the launcher for M <= GEMV_MAX_M. Fixed tiles, no autotune (the split depends on
# the tile): 64 W rows x 64 columns (32 bytes per row: one sector; one absmax per row at blocksize 64),
# 8 warps, 4 stages: 64 registers on sm_80/sm_90, no spills, 4 CTAs per SM (AOT report). SPLIT_K makes
# about one program per resident CTA slot, so each SM keeps ~4 x 4 x 4 KiB of packed W in flight.
GEMV_MAX_M = 16
GEMV_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)
_GEMV_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
_GEMV_CTAS_PER_SM = 4
_INTERP_SMS = 2  # under the interpreter: a few programs per n tile, so the tests cross splits


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_split(n: int, k: int, device, block_n: int, block_k: int) -> int:
    """K splits for the decode GEMV: about one program per CTA slot of the GPU, each at least one BLOCK_K,
    and no empty split (the kernel derives the same per-split length from the count)."""
    sms = _INTERP_SMS if device.type != "cuda" else _sm_count(device.index or 0)
    want = max(1, min(-(-_GEMV_CTAS_PER_SM * sms // triton.cdiv(n, block_n)), triton.cdiv(k, block_k)))
    k_per = triton.cdiv(triton.cdiv(k, want), block_k) * block_k
    return triton.cdiv(k, k_per)


def _nf4_gemv(x, weight, bias, u, lora_B, scaling, r, y):
    m, k = x.shape
    n = weight.out_features
    meta = dict(_GEMV_INTERP) if at.interpreting() else dict(GEMV_CONFIG)
    launch = {} if at.interpreting() else dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    split = gemv_split(n, k, x.device, meta["BLOCK_N"], meta["BLOCK_K"])
    ws = _empty((split, m, n), torch.float32, x.device)
    quant, nested = _quant_args(weight)
    has_lora = u is not None
    u_ = u if has_lora else x
    b_ = lora_B if has_lora else x
    _nf4_gemv_kernel[(triton.cdiv(n, meta["BLOCK_N"]), split)](
        x, *quant, bias if bias is not None else x, u_, b_, ws,
        m, n, k, r, split,
        x.stride(0), x.stride(1), u_.stride(0), u_.stride(1),
        b_.stride(0) if has_lora else 0, b_.stride(1) if has_lora else 0,
        float(weight.offset), float(scaling),
        BLOCKSIZE=weight.blocksize, NESTED=nested, K_ALIGNED=k % weight.blocksize == 0, K_EVEN=k % 2 == 0,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, R_PAD=_r_pad(r), IEEE=x.dtype == torch.float32,
        **meta, **launch)
    _splitk_sum_kernel[(triton.cdiv(m * n, 1024),)](ws, y, m * n, split, BLOCK=1024)
    return y


_TENSOR_ARG = {"fwd": "x_ptr", "dgrad": "dy_ptr"}
_KERNELS = {"fwd": _nf4_fwd_kernel, "dgrad": _nf4_dgrad_kernel}


@functools.cache
def _tuned(name: str):
    return at.tuned(_KERNELS[name], "gemm", ["M_BUCKET", "N", "K", "R", "NESTED", "BLOCKSIZE", "K_ALIGNED"],
                    _TENSOR_ARG[name])


def _launch(name: str, grid, *args, **kwargs):
    at.launch(_KERNELS[name], "gemm", _TENSOR_ARG[name], lambda: _tuned(name), grid, *args, **kwargs)


def _check(t, name, weight):
    if t.dim() != 2 or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be 2-D in one of {_DTYPES}, got {t.dtype} {tuple(t.shape)}")
    for part, v in (("packed", weight.packed), ("absmax", weight.absmax), ("code", weight.code),
                    ("nested_absmax", weight.nested_absmax), ("nested_code", weight.nested_code)):
        if v is not None and (v.device != t.device or not v.is_contiguous()):
            raise ValueError(f"weight.{part} must be contiguous on {t.device}")
    if weight.out_features * weight.in_features >= 2**62:
        raise ValueError("weight too large for 64-bit flat indexing")


def _quant_args(weight):
    nested = weight.nested_absmax is not None
    # Absent double-quant tensors: any valid pointer; NESTED=False never reads them.
    nabs = weight.nested_absmax if nested else weight.code
    ncode = weight.nested_code if nested else weight.code
    return (weight.packed, weight.absmax, weight.code, nabs, ncode), nested


def nf4_linear_fwd(x, weight, bias, u, lora_B, scaling: float):
    """y = x deq(W)^T + bias + s u B^T [M, N] in x's dtype."""
    _check(x, "x", weight)
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x must be [M, {weight.in_features}], got {tuple(x.shape)}")
    has_lora = u is not None
    r = u.shape[1] if has_lora else 1
    if has_lora and (lora_B.shape != (n, r) or not 1 <= r <= _MAX_R or u.dtype != x.dtype or lora_B.dtype != x.dtype):
        raise ValueError(f"u [M, r] and lora_B [{n}, r] must be {x.dtype} with 1 <= r <= {_MAX_R}, got "
                         f"{tuple(u.shape)} {u.dtype} and {tuple(lora_B.shape)} {lora_B.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    y = _empty((m, n), x.dtype, x.device)
    if m == 0:
        return y
    if m <= GEMV_MAX_M:
        return _nf4_gemv(x, weight, bias, u, lora_B, scaling, r, y)
    quant, nested = _quant_args(weight)
    u_ = u if has_lora else x
    b_ = lora_B if has_lora else x
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch("fwd", grid, x, *quant, bias if bias is not None else x, u_, b_, y,
            m, n, k, r, at.m_bucket(m),
            x.stride(0), x.stride(1), u_.stride(0), u_.stride(1),
            b_.stride(0) if has_lora else 0, b_.stride(1) if has_lora else 0, y.stride(0), y.stride(1),
            float(weight.offset), float(scaling),
            BLOCKSIZE=weight.blocksize, NESTED=nested, K_ALIGNED=k % weight.blocksize == 0,
            HAS_BIAS=bias is not None, HAS_LORA=has_lora,
            R_PAD=_r_pad(r), IEEE=x.dtype == torch.float32)
    return y


def nf4_linear_dgrad(dy, weight, d_u, lora_A):
    """dx = dy deq(W) + d_u A [M, K] in dy's dtype (the LoRA term skipped when d_u is None)."""
    _check(dy, "dy", weight)
    m, n = dy.shape
    k = weight.in_features
    if n != weight.out_features:
        raise ValueError(f"dy must be [M, {weight.out_features}], got {tuple(dy.shape)}")
    has_lora = d_u is not None
    r = d_u.shape[1] if has_lora else 1
    if has_lora and (lora_A.shape != (r, k) or not 1 <= r <= _MAX_R or d_u.dtype != dy.dtype
                     or lora_A.dtype != dy.dtype):
        raise ValueError(f"d_u [M, r] and lora_A [r, {k}] must be {dy.dtype} with 1 <= r <= {_MAX_R}, got "
                         f"{tuple(d_u.shape)} {d_u.dtype} and {tuple(lora_A.shape)} {lora_A.dtype}")
    dx = _empty((m, k), dy.dtype, dy.device)
    if m == 0:
        return dx
    quant, nested = _quant_args(weight)
    du_ = d_u if has_lora else dy
    a_ = lora_A if has_lora else dy
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    _launch("dgrad", grid, dy, *quant, du_, a_, dx,
            m, n, k, r, at.m_bucket(m),
            dy.stride(0), dy.stride(1), du_.stride(0), du_.stride(1), a_.stride(0), a_.stride(1),
            dx.stride(0), dx.stride(1), float(weight.offset),
            BLOCKSIZE=weight.blocksize, NESTED=nested, K_ALIGNED=k % weight.blocksize == 0, HAS_LORA=has_lora,
            R_PAD=_r_pad(r),
            IEEE=dy.dtype == torch.float32)
    return dx
