"""Forward kernels of the fused LoRA linear.

1. ``_shrink_kernel``: U = D(x) A^T [M, r], dropout mask generated in-kernel by Philox
   (the mask stream of reference/philox.py: 16 bits of one tl.randint4x per row and group of 8
   columns), fp32 accumulate, optional split-K
   over a strided set of K blocks into an fp32 workspace (many programs when M is small).
2. ``_fwd_gemm_kernel``: y = x W^T + b + s U B^T. The expand is one extra [BM, r] x [r, BN] dot
   into the main accumulator (s folded into the B tile) before the epilogue, so the low-rank
   term never touches HBM as an [M, N] tensor nor needs a second fp32 tile in registers.
   Program ids are grouped along M for L2 reuse of W tiles.

r is padded to R_PAD (a power of two >= 16, tl.dot's minimum) with masks; absent operands
(weight, bias, seed) are replaced by constexpr flags so no dead code runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dropout_scale(seed, rows, cols, K, p, inv_keep):
    """[BM, BK] fp32 factor: 1/(1-p) where the mask stream keeps (row, col), else 0.

    The stream of reference/philox.py: one tl.randint4x per row and group of 8 columns,
    16 bits per element. ``cols`` must be a block starting at a multiple of 8, so Philox
    runs on a [BM, BK/8] grid and its words are interleaved back to [BM, BK].
    """
    BM: tl.constexpr = rows.shape[0]
    BK: tl.constexpr = cols.shape[0]
    gcol = tl.max(tl.reshape(cols, (BK // 8, 8)), axis=1) >> 3
    ctr = rows[:, None].to(tl.int64) * ((K + 7) // 8) + gcol[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, ctr)
    thr = tl.cast(p * 65536.0 + 0.5, tl.int32)
    f0 = tl.join(_keep16(w0, thr, inv_keep, 0), _keep16(w0, thr, inv_keep, 16))  # [BM, BK/8, half]
    f1 = tl.join(_keep16(w1, thr, inv_keep, 0), _keep16(w1, thr, inv_keep, 16))
    f2 = tl.join(_keep16(w2, thr, inv_keep, 0), _keep16(w2, thr, inv_keep, 16))
    f3 = tl.join(_keep16(w3, thr, inv_keep, 0), _keep16(w3, thr, inv_keep, 16))
    f = tl.join(tl.join(f0, f1), tl.join(f2, f3))  # [BM, BK/8, half, word & 1, word >> 1]
    return tl.reshape(tl.permute(f, (0, 1, 4, 3, 2)), (BM, BK))


@triton.jit
def _keep16(word, thr, inv_keep, SHIFT: tl.constexpr):
    bits = ((word >> SHIFT) & 0xFFFF).to(tl.int32)
    return tl.where(bits >= thr, inv_keep, 0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no TF32) to match the reference.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _lora_acc(acc, u_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_um, stride_ur, stride_br, stride_bn,
              scaling, R_PAD: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    """acc + U[rows, :R] @ (scaling * Bt[:R, cols]), Bt[j, n] at b_ptr + j*stride_br + n*stride_bn.

    The low-rank term goes straight into the caller's accumulator (the scale folded into the
    [r, BN] operand tile), so the GEMM holds one fp32 [BM, BN] accumulator, not two: that is
    what lets a 128x256 tile compile without spills. r is walked in chunks of at most 64 so a
    rank-256 adapter neither spills nor bloats smem."""
    R_BLOCK: tl.constexpr = R_PAD if R_PAD < 64 else 64
    for r0 in tl.static_range(0, R_PAD, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        r_ok = rr < R
        u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + rr[:, None] * stride_br + cols[None, :] * stride_bn,
                      mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        if SCALE:
            b_t = (b_t.to(tl.float32) * scaling).to(b_ptr.dtype.element_ty)
        acc = _dot(u, b_t, acc, IEEE)
    return acc


@triton.jit
def _lora_dot(u_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_um, stride_ur, stride_br, stride_bn,
              BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr):
    """[BM, BN] fp32 = U[rows, :R] @ Bt[:R, cols] in its own accumulator (the masked dx epilogue,
    where the dropout mask multiplies the low-rank term alone)."""
    return _lora_acc(tl.zeros((BM, BN), dtype=tl.float32), u_ptr, b_ptr, rows, cols, row_ok, col_ok, R,
                     stride_um, stride_ur, stride_br, stride_bn, 1.0, R_PAD, IEEE, False)


@triton.jit
def _grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Consecutive programs sweep GROUP_M row-tiles per column-tile: the W tile stays in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
    p, inv_keep, SPLIT_K,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < M
    r_ok = rr < R
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)  # on-device seed: no host sync
    _shrink_block(x_ptr, a_ptr, u_ptr, rows, row_ok, rr, r_ok, K, pid_s, SPLIT_K,
                  stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
                  seed, p, inv_keep, R_PAD, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_K)


@triton.jit
def _shrink_block(x_ptr, a_ptr, u_ptr, rows, row_ok, rr, r_ok, K, pid_s, SPLIT_K,
                  stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
                  seed, p, inv_keep, R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One M tile of U = D(x) A^T (split s of SPLIT_K), shared by the single and the grouped shrink.
    Split s takes K blocks s, s + SPLIT_K, ...: no K_PER_SPLIT to keep aligned with BLOCK_K."""
    if HAS_DROPOUT:
        # U^T = A D(x)^T: the masked tile, computed in registers, is the MMA's B operand, which
        # goes through shared memory; as the A operand from registers it made ptxas serialize the
        # wgmma pipeline (C7515). r is the MMA's M side here (wgmma from r_pad 64, mma.sync below).
        acc_t = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
        for kb in range(pid_s, tl.cdiv(K, BLOCK_K), SPLIT_K):
            cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            xm = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, K, p, inv_keep)).to(x_ptr.dtype.element_ty)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc_t = _dot(a, tl.trans(xm), acc_t, IEEE)
        u_ptrs = u_ptr + pid_s * stride_us + rr[:, None] * stride_ur + rows[None, :] * stride_um
        tl.store(u_ptrs, acc_t.to(u_ptr.dtype.element_ty), mask=r_ok[:, None] & row_ok[None, :])
    else:
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for kb in range(pid_s, tl.cdiv(K, BLOCK_K), SPLIT_K):
            cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            a_t = tl.load(a_ptr + rr[None, :] * stride_ar + cols[:, None] * stride_ak,
                          mask=r_ok[None, :] & col_ok[:, None], other=0.0)
            acc = _dot(x, a_t, acc, IEEE)
        u_ptrs = u_ptr + pid_s * stride_us + rows[:, None] * stride_um + rr[None, :] * stride_ur
        tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, lb_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
    stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    R_PAD: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_W:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                          mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = _dot(x, w_t, acc, IEEE)
    # Expand: one [BM, r] x [r, BN] dot (in r chunks) into the same accumulator, before the epilogue.
    acc = _lora_acc(acc, u_ptr, lb_ptr, rows, cols, row_ok, col_ok, R, stride_um, stride_ur, stride_br, stride_bn,
                    scaling, R_PAD, IEEE, True)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
