"""Triton kernels of DoRA and their launchers; same signatures as ``reference/dora.py``.

1. ``_row_sq_kernel``: ||W_i||^2 (fp32), once per frozen weight.
2. ``_norm_kernel``: n_i = sqrt(||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i G B_i^T), G = A A^T [r, r]:
   one pass over W, W A^T accumulated in registers, never an [N, K] tensor.
3. ``_shrink_kernel``: U = D(x) A^T [M, r].
4. ``_fwd_kernel``: the base GEMM with the DoRA epilogue. At p = 0 one accumulator, x W^T;
   y_pre = acc + s U B^T, y = y_pre + (g - 1) y_pre + b. At p > 0 the K-loop keeps two
   accumulators over one read of x and W (x W^T and D(x) W^T): y_pre = D(x) W^T + s U B^T,
   y = x W^T + b + (g - 1) y_pre + s U B^T (PEFT's form, without its second GEMM launch).
5. ``_dudb_kernel``: one pass over dy (scaled by g as it is loaded): dU = s (g dy) B, dB += s (g dy)^T U
   (fp32 atomics) and the column reduction dm += sum_t dy * y_pre / n.
6. dA = dU^T D(x): LoRA's ``lora_bwd._da_kernel`` (dU already carries g); the tile helpers ``_dot``,
   ``_lora_dot`` and the shrink loop ``_shrink_block`` are ``lora_fwd``'s too.
7. ``_dx_kernel``: dgrad with g folded into the W tiles (dy diag(g) W = dy (diag(g) W)); at p > 0 two
   accumulators over one read of dy and W (dy W and dy diag(g - 1) W), then dx = dy W + D'(... + dU A).
Fixed launch configs (not autotuned yet); under TRITON_INTERPRET=1 small blocks keep CPU tests fast.
The dropout mask is regenerated from the on-device seed with ``lora_fwd._dropout_scale``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting
from .lora_bwd import _da_kernel
from .lora_fwd import _dot, _dropout_scale, _lora_dot, _shrink_block
from .lora_linear import _r_pad

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_R = 128


def _empty(shape, dtype, device):
    # Single allocation point for outputs: tests patch it to NaN-fill and check every element is written.
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _row_sq_kernel(w_ptr, out_ptr, N, K, stride_wn, stride_wk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=row_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * w, axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@triton.jit
def _norm_kernel(w_ptr, a_ptr, b_ptr, gram_ptr, sq_ptr, out_ptr, N, K, R,
                 stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling,
                 R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    r_ok = rr < R
    wa = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        wa = tl.dot(w, a_t, wa, input_precision="ieee")
    b = tl.load(b_ptr + rows[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    gram = tl.load(gram_ptr + rr[:, None] * R_PAD + rr[None, :])  # zero-padded to [R_PAD, R_PAD]
    cross = tl.sum(wa * b, axis=1)
    quad = tl.sum(tl.dot(b, gram, input_precision="ieee") * b, axis=1)
    sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0) + 2.0 * scaling * cross + scaling * scaling * quad
    tl.store(out_ptr + rows, tl.sqrt(tl.maximum(sq, 0.0)), mask=row_ok)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, seed_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                   stride_um, stride_ur, p, inv_keep,
                   R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < M
    r_ok = rr < R
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # LoRA's shrink tile loop (one split): with dropout the masked tile is the MMA's B operand, so
    # wgmma is not serialized (ptxas C7515), as in lora_fwd._shrink_kernel.
    _shrink_block(x_ptr, a_ptr, u_ptr, rows, row_ok, rr, r_ok, K, 0, 1,
                  stride_xm, stride_xk, stride_ar, stride_ak, 0, stride_um, stride_ur,
                  seed, p, inv_keep, R_PAD, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_K)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, lb_ptr, gm1_ptr, seed_ptr, y_ptr, yp_ptr,
                M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
                stride_bn, stride_br, stride_ym, stride_yn, scaling, p, inv_keep,
                R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                      mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(x, w_t, acc, IEEE)
        if HAS_DROPOUT:  # the same x and W tiles feed the second accumulator: W D(x)
            xd = (x.to(tl.float32) * _dropout_scale(seed, rows, ks, K, p, inv_keep)).to(x_ptr.dtype.element_ty)
            acc_d = _dot(xd, w_t, acc_d, IEEE)
    lora = scaling * _lora_dot(u_ptr, lb_ptr, rows, cols, row_ok, col_ok, R, stride_um, stride_ur,
                               stride_br, stride_bn, BLOCK_M, BLOCK_N, R_PAD, IEEE)
    gm1 = tl.load(gm1_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_DROPOUT:
        y_pre = acc_d + lora
        y = acc + gm1 * y_pre + lora
    else:
        y_pre = acc + lora
        y = y_pre + gm1 * y_pre  # g itself is never formed: no cancellation where g is close to 1
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None] * stride_ym + cols[None, :] * stride_yn
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(yp_ptr + offs, y_pre.to(yp_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dudb_kernel(dy_ptr, u_ptr, lb_ptr, g_ptr, yp_ptr, inv_n_ptr, du_ptr, db_ptr, dm_ptr,
                 M, N, R, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br,
                 stride_dum, stride_dur, stride_dbn, stride_dbr, scaling,
                 R_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < M
    r_ok = rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    acc_du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride_dym + cols[None, :] * stride_dyn
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        yp = tl.load(yp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
        inv_n = tl.load(inv_n_ptr + cols, mask=col_ok, other=0.0)
        tl.atomic_add(dm_ptr + cols, tl.sum(dy * yp, axis=0) * inv_n, mask=col_ok)
        dyg = (dy * g[None, :]).to(dy_ptr.dtype.element_ty)
        b = tl.load(lb_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        acc_du = _dot(dyg, b, acc_du, IEEE)
        d_b = _dot(tl.trans(dyg), u, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), IEEE)
        tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + rr[None, :] * stride_dbr, scaling * d_b,
                      mask=col_ok[:, None] & r_ok[None, :])
    tl.store(du_ptr + rows[:, None] * stride_dum + rr[None, :] * stride_dur,
             (scaling * acc_du).to(du_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, g_ptr, gm1_ptr, du_ptr, a_ptr, seed_ptr, dx_ptr,
               M, N, K, R, stride_dym, stride_dyn, stride_wn, stride_wk, stride_dum, stride_dur,
               stride_ar, stride_ak, stride_dxm, stride_dxk, p, inv_keep,
               R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        # dy diag(g) W = dy (diag(g) W): the per-column scale of dy is a per-row scale of the W tile, so the
        # tile computed in registers is the MMA's B operand (through shared memory) and dy, straight from
        # memory, its A operand; a register-scaled A operand made ptxas serialize wgmma (C7515).
        if HAS_DROPOUT:
            gm1 = tl.load(gm1_ptr + cols, mask=col_ok, other=0.0)
            acc = _dot(dy, w, acc, IEEE)
            acc_d = _dot(dy, (w.to(tl.float32) * gm1[:, None]).to(w_ptr.dtype.element_ty), acc_d, IEEE)
        else:
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
            acc = _dot(dy, (w.to(tl.float32) * g[:, None]).to(w_ptr.dtype.element_ty), acc, IEEE)
    lora = _lora_dot(du_ptr, a_ptr, rows, ks, row_ok, k_ok, R, stride_dum, stride_dur, stride_ar, stride_ak,
                     BLOCK_M, BLOCK_K, R_PAD, IEEE)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        dx = acc + _dropout_scale(seed, rows, ks, K, p, inv_keep) * (acc_d + lora)
    else:
        dx = acc + lora
    tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk, dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


# Launch configs: (blocks, num_warps, num_stages). The GEMM tile is 128 x 64: with two fp32 accumulators
# (p > 0) a 128 x 128 tile spills on sm_80 (lora-triton kernels). The interpreter gets tl.dot's minimum.
_GPU = {"gemm": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), "rows": dict(BLOCK_N=64, BLOCK_K=128),
        "shrink": dict(BLOCK_M=64, BLOCK_K=128), "dudb": dict(BLOCK_M=64, BLOCK_N=64),
        "da": dict(BLOCK_M=64, BLOCK_K=64)}
_INTERP = {"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), "rows": dict(BLOCK_N=16, BLOCK_K=16),
           "shrink": dict(BLOCK_M=16, BLOCK_K=16), "dudb": dict(BLOCK_M=16, BLOCK_N=16),
           "da": dict(BLOCK_M=16, BLOCK_K=16)}
_WARPS = {"gemm": 8, "rows": 4, "shrink": 4, "dudb": 4, "da": 4}


def config(family: str) -> tuple[dict, dict]:
    """(block constexprs, launch options) of a kernel family on this machine."""
    if interpreting():
        return dict(_INTERP[family]), {}
    return dict(_GPU[family]), dict(num_warps=_WARPS[family], num_stages=3)


def _launch(kernel, family, grid_of, *args, **flags):
    blocks, opts = config(family)
    kernel[grid_of(blocks)](*args, **flags, **blocks, **opts)


def _check(x, weight, lora_A, lora_B, dropout_p, seed):
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be 2-D in one of {_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    r, n = lora_A.shape[0], lora_B.shape[0]
    if weight is None or weight.shape != (n, k) or lora_A.shape != (r, k) or lora_B.shape != (n, r):
        raise ValueError(f"expected weight [N, {k}], lora_A [r, {k}], lora_B [N, r]; got "
                         f"{None if weight is None else tuple(weight.shape)}, {tuple(lora_A.shape)}, "
                         f"{tuple(lora_B.shape)}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"DoRA kernels take ranks 1..{_MAX_R}, got {r}")
    if max(m * max(k, n), n * k) >= 2**31:
        raise ValueError(f"DoRA kernels use 32-bit offsets; M={m}, K={k}, N={n} is too large: split the batch")
    if dropout_p > 0.0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs seed: an int64 tensor [1] on x's device")
    return m, k, n, r


def dora_weight_sq(weight):
    n, k = weight.shape
    out = _empty((n,), torch.float32, weight.device)
    _launch(_row_sq_kernel, "rows", lambda b: (triton.cdiv(n, b["BLOCK_N"]),),
            weight, out, n, k, weight.stride(0), weight.stride(1))
    return out


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, weight_sq):
    n, k = weight.shape
    r = lora_A.shape[0]
    r_pad = _r_pad(r)
    a, b = lora_A.float(), lora_B.float()  # [r, K] and [N, r]: tiny next to W
    gram = torch.zeros((r_pad, r_pad), dtype=torch.float32, device=weight.device)
    gram[:r, :r] = a @ a.t()
    out = _empty((n,), torch.float32, weight.device)
    _launch(_norm_kernel, "rows", lambda bl: (triton.cdiv(n, bl["BLOCK_N"]),),
            weight, a, b, gram, weight_sq, out, n, k, r, weight.stride(0), weight.stride(1),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(scaling), R_PAD=r_pad)
    return out


def _scales(magnitude, weight_norm):
    m = magnitude.float()
    return m / weight_norm, (m - weight_norm) / weight_norm


def dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling: float, dropout_p: float,
                    seed):
    m, k, n, r = _check(x, weight, lora_A, lora_B, dropout_p, seed)
    dev, dt = x.device, x.dtype
    y, y_pre, u = _empty((m, n), dt, dev), _empty((m, n), dt, dev), _empty((m, r), dt, dev)
    if m == 0:
        return y, u, y_pre
    _, gm1 = _scales(magnitude, weight_norm)
    r_pad, ieee, drop = _r_pad(r), dt == torch.float32, dropout_p > 0.0
    p, inv_keep = float(dropout_p), 1.0 / (1.0 - float(dropout_p))
    seed_arg = seed if drop else x
    _launch(_shrink_kernel, "shrink", lambda b: (triton.cdiv(m, b["BLOCK_M"]),),
            x, lora_A, u, seed_arg, m, k, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
            u.stride(0), u.stride(1), p, inv_keep, R_PAD=r_pad, HAS_DROPOUT=drop, IEEE=ieee)
    _launch(_fwd_kernel, "gemm", lambda b: (triton.cdiv(m, b["BLOCK_M"]), triton.cdiv(n, b["BLOCK_N"])),
            x, weight, bias if bias is not None else x, u, lora_B, gm1, seed_arg, y, y_pre, m, n, k, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), float(scaling), p, inv_keep,
            R_PAD=r_pad, HAS_BIAS=bias is not None, HAS_DROPOUT=drop, IEEE=ieee)
    return y, u, y_pre


def dora_linear_bwd(dy, x, weight, lora_A, lora_B, magnitude, weight_norm, u, y_pre, scaling: float,
                    dropout_p: float, seed, need_dx: bool = True):
    """Returns (dx or None, dA [r, K] float32, dB [N, r] float32, dm [N] float32)."""
    m, k, n, r = _check(x, weight, lora_A, lora_B, dropout_p, seed)
    if dy.shape != (m, n) or y_pre.shape != (m, n) or u.shape != (m, r):
        raise ValueError(f"dy and y_pre must be [{m}, {n}], u [{m}, {r}]; got {tuple(dy.shape)}, "
                         f"{tuple(y_pre.shape)}, {tuple(u.shape)}")
    dev, dt = x.device, x.dtype
    g, gm1 = _scales(magnitude, weight_norm)
    inv_n = 1.0 / weight_norm
    r_pad, ieee, drop = _r_pad(r), dt == torch.float32, dropout_p > 0.0
    p, inv_keep = float(dropout_p), 1.0 / (1.0 - float(dropout_p))
    seed_arg = seed if drop else x
    d_b = torch.zeros((n, r), dtype=torch.float32, device=dev)  # atomics accumulate into these
    d_m = torch.zeros((n,), dtype=torch.float32, device=dev)
    d_u = _empty((m, r), dt, dev)
    d_a = _empty((r, k), torch.float32, dev)
    dx = _empty((m, k), dt, dev) if need_dx else None
    if m == 0:
        return dx, d_a.zero_(), d_b, d_m
    _launch(_dudb_kernel, "dudb", lambda b: (triton.cdiv(m, b["BLOCK_M"]),),
            dy, u, lora_B, g, y_pre, inv_n, d_u, d_b, d_m, m, n, r, dy.stride(0), dy.stride(1),
            u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1), d_u.stride(0), d_u.stride(1),
            d_b.stride(0), d_b.stride(1), float(scaling), R_PAD=r_pad, IEEE=ieee)
    # dA = dU^T D(x) is LoRA's (dU already carries g): lora_bwd's kernel, one M split, r in chunks of 64.
    ws = d_a.unsqueeze(0)
    _launch(_da_kernel, "da", lambda b: (triton.cdiv(k, b["BLOCK_K"]), 1, triton.cdiv(r_pad, 64)),
            d_u, x, seed_arg, ws, m, k, r, 0, d_u.stride(0), d_u.stride(1), x.stride(0), x.stride(1),
            *ws.stride(), p, inv_keep, 1, R_PAD=r_pad, HAS_DROPOUT=drop, IEEE=ieee)
    if need_dx:
        # The dgrad tile's second axis walks K (BLOCK_K), its inner loop N (BLOCK_N).
        _launch(_dx_kernel, "gemm", lambda b: (triton.cdiv(m, b["BLOCK_M"]), triton.cdiv(k, b["BLOCK_K"])),
                dy, weight, g, gm1, d_u, lora_A, seed_arg, dx, m, n, k, r, dy.stride(0), dy.stride(1),
                weight.stride(0), weight.stride(1), d_u.stride(0), d_u.stride(1), lora_A.stride(0),
                lora_A.stride(1), dx.stride(0), dx.stride(1), p, inv_keep,
                R_PAD=r_pad, HAS_DROPOUT=drop, IEEE=ieee)
    return dx, d_a, d_b, d_m


def _aot_config(family: str):
    return lambda r_pad: triton.Config(dict(_GPU[family]), num_warps=_WARPS[family], num_stages=3)


_F32 = "*fp32"
# For ``aot_report``: name -> (kernel, config for a padded rank, flags of the heaviest path, fp32 pointers).
AOT_KERNELS = {
    "dora_row_sq": (_row_sq_kernel, _aot_config("rows"), {}, dict(out_ptr=_F32)),
    "dora_norm": (_norm_kernel, _aot_config("rows"), {},
                  dict(a_ptr=_F32, b_ptr=_F32, gram_ptr=_F32, sq_ptr=_F32, out_ptr=_F32)),
    "dora_shrink": (_shrink_kernel, _aot_config("shrink"), dict(HAS_DROPOUT=True), {}),
    "dora_fwd": (_fwd_kernel, _aot_config("gemm"), dict(HAS_BIAS=True, HAS_DROPOUT=True), dict(gm1_ptr=_F32)),
    "dora_dudb": (_dudb_kernel, _aot_config("dudb"), {},
                  dict(g_ptr=_F32, inv_n_ptr=_F32, db_ptr=_F32, dm_ptr=_F32)),
    "dora_da": (_da_kernel, _aot_config("da"), dict(HAS_DROPOUT=True), {}),
    "dora_dx": (_dx_kernel, _aot_config("gemm"), dict(HAS_DROPOUT=True), dict(g_ptr=_F32, gm1_ptr=_F32)),
}
