"""Persistent tensor-descriptor (TMA) twins of the two main GEMMs of the fused LoRA linear.

``_fwd_gemm_tma_kernel`` (y = x W^T + b + s U B^T) and ``_dx_tma_kernel`` (dx = dy W + D'(dU A))
compute exactly what ``lora_fwd._fwd_gemm_kernel`` / ``lora_bwd._dx_kernel`` compute, built the
way Hopper GEMMs reach cuBLAS speed:

* operands stream through host-built tensor descriptors (``TensorDescriptor``): on sm_90+ the
  loads become TMA bulk copies (UTMALDG in SASS) completing on mbarriers, no address arithmetic
  in the main loop; the stores go out through TMA too (UTMASTG), in column halves (epilogue
  subtiling: a 128x256 tile is never staged in shared memory whole), except the masked dgrad
  epilogue, which stores its column quarters with pointers;
* a persistent grid of one program per SM walks the output tiles in grouped order
  (``_grouped_pid``: GROUP_M row tiles per column tile, so W tiles stay in L2); with
  ``FLATTEN`` (default, autotuned against the nested loops) the tile loop and the K loop are one
  software-pipelined loop, so the next tile's first K blocks load during this tile's epilogue;
* the low-rank term goes into the main accumulator (``lora_fwd._lora_acc``): one fp32 tile, so
  128x256x64 with 3 stages compiles without spills (``lora-triton kernels --arch sm_90``).

The descriptors need unit inner strides, 16-byte aligned rows and bases (``kernels.gemm_launch``
checks and otherwise runs the pointer kernels, which are also the sm_80 path: cp.async loads).
A weight stored transposed (GPT-2 Conv1D, the op sees a [N, K] view with strides (1, N)) gets a
descriptor over its [K, N] storage (``W_KN``). U, B, A, dU and the bias are tiny and loaded
with pointers (their rows, r elements, are rarely 16-byte multiples). Triton's interpreter runs
these kernels on CPU tensors, so the CPU tests cover them as well as the pointer twins.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lora_bwd import _dx_acc_init, _dx_quarters
from .lora_fwd import _dot, _grouped_pid, _lora_acc


@triton.jit
def _halves(acc):
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def _store_split(desc, acc, off_m, off_n, SPLIT: tl.constexpr):
    # Epilogue subtiling: the store descriptor's block is [BM, BN / SPLIT].
    BN: tl.constexpr = acc.shape[1]
    if SPLIT == 1:
        desc.store([off_m, off_n], acc.to(desc.dtype))
    else:
        a0, a1 = _halves(acc)
        desc.store([off_m, off_n], a0.to(desc.dtype))
        desc.store([off_m, off_n + BN // 2], a1.to(desc.dtype))


@triton.jit
def _fwd_gemm_tma_kernel(
    x_desc, w_desc, y_desc, bias_ptr, u_ptr, lb_ptr,
    M, N, K, R, M_BUCKET,
    stride_um, stride_ur, stride_bn, stride_br,
    scaling,
    R_PAD: tl.constexpr, W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr = True,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            x = x_desc.load([off_m, kt * BLOCK_K])
            if W_KN:
                w_t = w_desc.load([kt * BLOCK_K, off_n])
            else:
                w_t = w_desc.load([off_n, kt * BLOCK_K]).T
            acc = _dot(x, w_t, acc, IEEE)
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = _lora_acc(acc, u_ptr, lb_ptr, rows, cols, rows < M, cols < N, R, stride_um, stride_ur,
                        stride_br, stride_bn, scaling, R_PAD, IEEE, True)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        _store_split(y_desc, acc, off_m, off_n, EPI_SPLIT)


@triton.jit
def _dx_tma_kernel(
    dy_desc, w_desc, dx_desc, du_ptr, a_ptr, seed_ptr, dx_ptr, x_ptr, da_ptr,
    M, N, K, R, M_BUCKET,
    stride_dum, stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk, stride_xm, stride_xk,
    stride_dar, stride_dak,
    p, inv_keep,
    R_PAD: tl.constexpr, W_KN: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr = False, FLATTEN: tl.constexpr = True,
    FUSE_DA: tl.constexpr = False,
):
    # As _dx_kernel: output tile [BLOCK_M, BLOCK_N] of dx [M, K], reduction over the layer's N in
    # BLOCK_K steps. With dropout the masked epilogue runs on column quarters and stores them with
    # pointers: staging quarters for TMA stores next to the Philox words spilled at r = 64 (255
    # registers + 8 bytes; pointer stores: 239, none). ACCUMULATE reads the old dx tile with pointers.
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    n_tiles = tl.cdiv(N, BLOCK_K)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_k = _grouped_pid(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_k + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < K
        acc = _dx_acc_init(dx_ptr, rows, cols, row_ok, col_ok, stride_dxm, stride_dxk, BLOCK_M, BLOCK_N, ACCUMULATE)
        for nt in range(n_tiles):
            dy = dy_desc.load([off_m, nt * BLOCK_K])
            if W_KN:
                w = w_desc.load([off_k, nt * BLOCK_K]).T
            else:
                w = w_desc.load([nt * BLOCK_K, off_k])
            acc = _dot(dy, w, acc, IEEE)
        if HAS_DROPOUT:
            _dx_quarters(acc, du_ptr, a_ptr, dx_ptr, seed, rows, off_k, M, K, R, stride_dum, stride_dur,
                         stride_ar, stride_ak, stride_dxm, stride_dxk, p, inv_keep, x_ptr, da_ptr,
                         stride_xm, stride_xk, stride_dar, stride_dak, R_PAD, IEEE, FUSE_DA)
        else:
            acc = _lora_acc(acc, du_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dum, stride_dur,
                            stride_ar, stride_ak, 1.0, R_PAD, IEEE, False)
            _store_split(dx_desc, acc, off_m, off_k, EPI_SPLIT)
