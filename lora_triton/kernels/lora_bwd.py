"""Backward kernels of the fused LoRA linear.

1. ``_dudb_kernel``: one pass over dy computes dU = s dy B [M, r] (accumulated over the N loop
   in registers) and dB = s dy^T U [N, r] (per M tile, fp32 atomics into a zeroed buffer
   when several M tiles exist).
2. ``_da_kernel``: dA = dU^T D(x) [r, K], the dropout mask regenerated from the seed exactly as
   in the forward (never stored); split over M into an fp32 workspace when K alone gives
   too few programs.
3. ``_dx_kernel``: dx = dy W + D'(dU A). The dgrad GEMM loops over N; its epilogue adds one
   [BM, r] x [r, BK] dot masked by the regenerated dropout mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lora_fwd import _dot, _dropout_scale, _grouped_pid, _lora_acc, _lora_dot


@triton.jit
def _dudb_kernel(
    dy_ptr, u_ptr, lb_ptr, du_ptr, db_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br,
    stride_dum, stride_dur, stride_dbn, stride_dbr,
    scaling,
    R_PAD: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Axis 1 walks r in chunks of R_BLOCK: fp32 accumulators of [BM, 256] would spill.
    R_BLOCK: tl.constexpr = R_PAD if R_PAD < 64 else 64
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    row_ok = rows < M
    r_ok = rr < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    du = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(lb_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        du = _dot(dy, b, du, IEEE)
        db = _dot(tl.trans(dy), u, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32), IEEE) * scaling
        db_ptrs = db_ptr + cols[:, None] * stride_dbn + rr[None, :] * stride_dbr
        db_mask = col_ok[:, None] & r_ok[None, :]
        if ATOMIC:
            # relaxed: the sums need no ordering against other memory (the default acq_rel fences each one)
            tl.atomic_add(db_ptrs, db, mask=db_mask, sem="relaxed")
        else:
            tl.store(db_ptrs, db, mask=db_mask)
    tl.store(du_ptr + rows[:, None] * stride_dum + rr[None, :] * stride_dur,
             (du * scaling).to(du_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _da_kernel(
    du_ptr, x_ptr, seed_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_dum, stride_dur, stride_xm, stride_xk, stride_das, stride_dar, stride_dak,
    p, inv_keep, SPLIT_M,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    R_BLOCK: tl.constexpr = R_PAD if R_PAD < 64 else 64  # axis 2 walks r in chunks (see _dudb_kernel)
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(2) * R_BLOCK + tl.arange(0, R_BLOCK)
    col_ok = cols < K
    r_ok = rr < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # Accumulate dA^T [BK, R_PAD] = D(x)^T dU: the K tile is the MMA's M side (>= 64 rows on
    # Hopper's wgmma), r the small N side.
    acc = tl.zeros((BLOCK_K, R_BLOCK), dtype=tl.float32)
    for mb in range(pid_s, tl.cdiv(M, BLOCK_M), SPLIT_M):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        du = tl.load(du_ptr + rows[:, None] * stride_dum + rr[None, :] * stride_dur,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, K, p, inv_keep)).to(x_ptr.dtype.element_ty)
        acc = _dot(tl.trans(x), du, acc, IEEE)
    tl.store(da_ptr + pid_s * stride_das + rr[None, :] * stride_dar + cols[:, None] * stride_dak,
             acc, mask=r_ok[None, :] & col_ok[:, None])


@triton.jit
def _da_from_tile(scale, x_ptr, du_ptr, da_ptr, rows, cols, M, K, R, stride_xm, stride_xk, stride_dum, stride_dur,
                  stride_dar, stride_dak, R_PAD: tl.constexpr, IEEE: tl.constexpr):
    """dA[:, cols] += dU[rows]^T D(x)[rows, cols] (fp32 relaxed atomics), with the dropout factor
    tile ``scale`` the dgrad epilogue already generated for these rows and columns."""
    row_ok = rows < M
    col_ok = cols < K
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    xm_t = tl.trans((x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty))
    R_BLOCK: tl.constexpr = R_PAD if R_PAD < 64 else 64
    for r0 in tl.static_range(0, R_PAD, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        r_ok = rr < R
        du = tl.load(du_ptr + rows[:, None] * stride_dum + rr[None, :] * stride_dur,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        part = _dot(xm_t, du, tl.zeros((cols.shape[0], R_BLOCK), dtype=tl.float32), IEEE)
        tl.atomic_add(da_ptr + rr[None, :] * stride_dar + cols[:, None] * stride_dak, part,
                      mask=col_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _dx_epilogue(acc, du_ptr, a_ptr, dx_ptr, seed, rows, cols, M, K, R, stride_dum, stride_dur,
                 stride_ar, stride_ak, stride_dxm, stride_dxk, p, inv_keep,
                 x_ptr, da_ptr, stride_xm, stride_xk, stride_dar, stride_dak,
                 R_PAD: tl.constexpr, IEEE: tl.constexpr, FUSE_DA: tl.constexpr):
    """dx tile = acc + D'(dU A) over the given columns, the mask generated once for exactly them;
    with FUSE_DA the same mask tile also feeds this tile's share of dA (``_da_from_tile``)."""
    scale = _dropout_scale(seed, rows, cols, K, p, inv_keep)
    lora = _lora_dot(du_ptr, a_ptr, rows, cols, rows < M, cols < K, R, stride_dum, stride_dur, stride_ar, stride_ak,
                     acc.shape[0], acc.shape[1], R_PAD, IEEE)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             (acc + lora * scale).to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < K)[None, :])
    if FUSE_DA:
        _da_from_tile(scale, x_ptr, du_ptr, da_ptr, rows, cols, M, K, R, stride_xm, stride_xk, stride_dum,
                      stride_dur, stride_dar, stride_dak, R_PAD, IEEE)


@triton.jit
def _dx_quarters(acc, du_ptr, a_ptr, dx_ptr, seed, rows, off_k, M, K, R, stride_dum, stride_dur,
                 stride_ar, stride_ak, stride_dxm, stride_dxk, p, inv_keep,
                 x_ptr, da_ptr, stride_xm, stride_xk, stride_dar, stride_dak,
                 R_PAD: tl.constexpr, IEEE: tl.constexpr, FUSE_DA: tl.constexpr):
    # The masked epilogue runs on column quarters (the main loop keeps the full tile for the
    # MMA): on the whole 128x128 tile it needs 230-255 registers (sm_80/sm_90, r 16-64), on
    # quarters 183, which leaves headroom for larger autotune tiles.
    BM: tl.constexpr = acc.shape[0]
    QN: tl.constexpr = acc.shape[1] // 4
    c0 = off_k + tl.arange(0, QN)
    h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, 2 * QN)), (0, 2, 1)))
    q0, q1 = tl.split(tl.permute(tl.reshape(h0, (BM, 2, QN)), (0, 2, 1)))
    q2, q3 = tl.split(tl.permute(tl.reshape(h1, (BM, 2, QN)), (0, 2, 1)))
    _dx_epilogue(q0, du_ptr, a_ptr, dx_ptr, seed, rows, c0, M, K, R, stride_dum, stride_dur, stride_ar, stride_ak,
                 stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr, stride_xm, stride_xk, stride_dar, stride_dak,
                 R_PAD, IEEE, FUSE_DA)
    _dx_epilogue(q1, du_ptr, a_ptr, dx_ptr, seed, rows, c0 + QN, M, K, R, stride_dum, stride_dur, stride_ar,
                 stride_ak, stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr, stride_xm, stride_xk, stride_dar,
                 stride_dak, R_PAD, IEEE, FUSE_DA)
    _dx_epilogue(q2, du_ptr, a_ptr, dx_ptr, seed, rows, c0 + 2 * QN, M, K, R, stride_dum, stride_dur, stride_ar,
                 stride_ak, stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr, stride_xm, stride_xk, stride_dar,
                 stride_dak, R_PAD, IEEE, FUSE_DA)
    _dx_epilogue(q3, du_ptr, a_ptr, dx_ptr, seed, rows, c0 + 3 * QN, M, K, R, stride_dum, stride_dur, stride_ar,
                 stride_ak, stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr, stride_xm, stride_xk, stride_dar,
                 stride_dak, R_PAD, IEEE, FUSE_DA)


@triton.jit
def _dx_acc_init(dx_ptr, rows, cols, row_ok, col_ok, stride_dxm, stride_dxk, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr):
    """The dgrad accumulator's start, shared by the pointer and the descriptor kernels: the dx tile
    already there (ACCUMULATE, read with pointers) or zeros."""
    if ACCUMULATE:
        return tl.load(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, du_ptr, a_ptr, seed_ptr, dx_ptr, x_ptr, da_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dum, stride_dur,
    stride_ar, stride_ak, stride_dxm, stride_dxk, stride_xm, stride_xk, stride_dar, stride_dak,
    p, inv_keep,
    R_PAD: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr = False, FUSE_DA: tl.constexpr = False,
):
    # ACCUMULATE adds to dx instead of overwriting it (the grouped op sums its projections; each
    # program alone owns its tile, so there is no race). FUSE_DA (dropout only): the epilogue's
    # mask tiles also give dA += dU^T D(x) into a zeroed fp32 da_ptr [R, K], so backward
    # generates the mask once and skips the dA launch.
    # Output tile [BLOCK_M, BLOCK_N] of dx [M, K]: "N" of this GEMM is K, the reduction runs over
    # the layer's N (called BLOCK_K here so the gemm config family serves both GEMMs).
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    acc = _dx_acc_init(dx_ptr, rows, cols, row_ok, col_ok, stride_dxm, stride_dxk, BLOCK_M, BLOCK_N, ACCUMULATE)
    if HAS_W:
        for n0 in range(0, N, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            n_ok = ns < N
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(dy, w, acc, IEEE)
    if HAS_DROPOUT:
        _dx_quarters(acc, du_ptr, a_ptr, dx_ptr, tl.load(seed_ptr), rows, pid_k * BLOCK_N, M, K, R, stride_dum,
                     stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr,
                     stride_xm, stride_xk, stride_dar, stride_dak, R_PAD, IEEE, FUSE_DA)
    else:
        # No mask: dU A (dU already scaled) accumulates straight into the dgrad accumulator.
        acc = _lora_acc(acc, du_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dum, stride_dur,
                        stride_ar, stride_ak, 1.0, R_PAD, IEEE, False)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
