"""Triton kernels for multi-adapter LoRA serving (one batch, many adapters, mixed ranks).

y = x W^T + b + sum over each token's slots of w * s_a * B_a[:, :r_a] A_a[:r_a] x.

The base GEMM is torch's (cuBLAS), so rows without an adapter are bit-equal to F.linear.
The LoRA term is added in place by the kernels below:

* a plan (``build_plan``, torch ops only, no host sync: CUDA-graph capturable) sorts the
  token slots by (slot, adapter) and cuts each adapter's run into tiles of BLOCK_M rows; tiles
  carry (adapter, first sorted row, end row). The grid is sized by a static bound on the tile
  count; surplus programs exit at once. x is never permuted: kernels gather rows by index.
* ``_shrink_kernel``: U = x A_a^T for one tile, one rank tile, one K split. Programs whose rank
  tile starts at or beyond r_a exit, so padding up to r_max costs neither bytes nor FLOPs.
  Split-K partials go to separate buffers and are summed by the expand: deterministic, and no
  zeroing pass.
* ``_expand_kernel``: y[tok] += (s_a * w) U B_a^T, looping over rank tiles only up to r_a.
* ``_fused_kernel`` (decode, few tokens): shrink and expand in one program; the rank-r
  intermediate stays in registers (padded to a power of two, but padded A/B rows are masked
  out of the loads, so they cost no memory traffic, which is what bounds decode).

With k > 1 slots per token, the expand/fused kernels run once per slot: within one slot a token
appears once, so no two programs write the same y row (no atomics, deterministic sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_rows(tile, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, perm_ptr, NUM_SLOTS, BLOCK_M: tl.constexpr):
    adapter = tl.load(tile_adapter_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    rend = tl.load(tile_rend_ptr + tile)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rend
    slot = tl.load(perm_ptr + offs_m, mask=m_ok, other=0)
    return adapter, offs_m, m_ok, slot, slot // NUM_SLOTS


@triton.jit
def _rank(ranks_ptr, adapter, R):
    # Clamped to [0, r_max] where it is loaded: with validate=False nothing checked the values on the host,
    # and a bad rank must never index past r_max.
    return tl.minimum(tl.maximum(tl.load(ranks_ptr + adapter), 0), R)


@triton.jit
def _shrink_acc(acc, x_rows, a_base, offs_r, r_ok, m_ok, k_lo, k_hi, stride_xk, stride_ar, stride_ak,
                BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + x[rows, k_lo:k_hi] A[adapter, offs_r, k_lo:k_hi]^T: the shrink over one K range."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xt = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(xt, at.to(xt.dtype), input_precision=DOT_PREC)
    return acc


@triton.jit
def _row_coef(scal_ptr, adapter, w_ptr, slot, m_ok, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's factor on the adapter's delta: its scaling, times the slot's weight when there are weights."""
    coef = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scal_ptr + adapter)
    if HAS_W:
        coef *= tl.load(w_ptr + slot, mask=m_ok, other=0.0)
    return coef


@triton.jit
def _add_into(y_ptrs, y_mask, delta):
    """y[tile] += delta (the sum in fp32, one rounding to y's dtype)."""
    old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (old.to(tl.float32) + delta).to(y_ptrs.dtype.element_ty), mask=y_mask)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, perm_ptr, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, ranks_ptr,
                   K, NUM_SLOTS, stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_us, stride_um, R,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    adapter, offs_m, m_ok, slot, tok = _tile_rows(tile, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, perm_ptr,
                                                  NUM_SLOTS, BLOCK_M)
    if adapter < 0:
        return
    rank = _rank(ranks_ptr, adapter, R)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:  # rank tile entirely in the padding of this adapter
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    x_rows = x_ptr + tok.to(tl.int64) * stride_xm
    a_base = a_ptr + adapter.to(tl.int64) * stride_al
    acc = _shrink_acc(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_rows, a_base, offs_r, r_ok, m_ok, k_lo,
                      k_hi, stride_xk, stride_ar, stride_ak, BLOCK_K, DOT_PREC)
    u_ptrs = u_ptr + pid_s * stride_us + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(u_ptr, b_ptr, y_ptr, w_ptr, perm_ptr, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, ranks_ptr,
                   scal_ptr, N, NUM_SLOTS, tile_offset, stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                   stride_us, stride_um, R, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tile_offset + tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter, offs_m, m_ok, slot, tok = _tile_rows(tile, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, perm_ptr,
                                                  NUM_SLOTS, BLOCK_M)
    if adapter < 0:
        return
    rank = _rank(ranks_ptr, adapter, R)
    coef = _row_coef(scal_ptr, adapter, w_ptr, slot, m_ok, HAS_W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_base = b_ptr + adapter.to(tl.int64) * stride_bl
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # real rank tiles only
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        u_mask = m_ok[:, None] & r_ok[None, :]
        u_ptrs = u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :]
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            u += tl.load(u_ptrs + s * stride_us, mask=u_mask, other=0.0)
        u = (u * coef[:, None]).to(y_ptr.dtype.element_ty)
        bt = tl.load(b_base + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc += tl.dot(u, bt.to(u.dtype), input_precision=DOT_PREC)
    y_ptrs = y_ptr + tok[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    _add_into(y_ptrs, m_ok[:, None] & n_ok[None, :], acc)


@triton.jit
def _fused_kernel(x_ptr, a_ptr, b_ptr, y_ptr, w_ptr, perm_ptr, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr,
                  ranks_ptr, scal_ptr, K, N, NUM_SLOTS, tile_offset, n_per_prog,
                  stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_bl, stride_bn, stride_br,
                  stride_ym, stride_yn, R, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tile_offset + tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter, offs_m, m_ok, slot, tok = _tile_rows(tile, tile_adapter_ptr, tile_row0_ptr, tile_rend_ptr, perm_ptr,
                                                  NUM_SLOTS, BLOCK_M)
    if adapter < 0:
        return
    rank = _rank(ranks_ptr, adapter, R)
    if rank == 0:
        return
    coef = _row_coef(scal_ptr, adapter, w_ptr, slot, m_ok, HAS_W, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank  # padded rows of A/B are never loaded
    x_rows = x_ptr + tok.to(tl.int64) * stride_xm
    a_base = a_ptr + adapter.to(tl.int64) * stride_al
    u = _shrink_acc(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_rows, a_base, offs_r, r_ok, m_ok, 0, K,
                    stride_xk, stride_ar, stride_ak, BLOCK_K, DOT_PREC)
    u_c = (u * coef[:, None]).to(y_ptr.dtype.element_ty)
    b_base = b_ptr + adapter.to(tl.int64) * stride_bl
    y_rows = y_ptr + tok[:, None].to(tl.int64) * stride_ym
    n_lo = pid_n * n_per_prog
    n_hi = tl.minimum(n_lo + n_per_prog, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        # n_per_prog is a multiple of BLOCK_N (launcher), so no block crosses n_hi except at N:
        # masking with N alone, from a block start the compiler knows is aligned, lets y's loads and
        # stores go 128 bits wide (st.global.v4 in PTX; with `< n_hi`, 16-bit scalar ones).
        offs_n = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
        n_ok = offs_n < N
        bt = tl.load(b_base + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        delta = tl.dot(u_c, bt.to(u_c.dtype), input_precision=DOT_PREC)
        _add_into(y_rows + offs_n[None, :] * stride_yn, m_ok[:, None] & n_ok[None, :], delta)


# ----------------------------------------------------------------------------- launchers

DECODE_MAX_TOKENS = 16  # T at or below this takes the fused decode kernel
_TARGET_PROGRAMS = 264  # about two waves on an H100/H200 (132 SMs)
_NUM_WARPS = 8  # 4 warps spill the gathered-row pointer tiles on sm_90 (checked AOT with cuobjdump)


def build_plan(adapter_ids: torch.Tensor, num_adapters: int, block_m: int):
    """Sort token slots by (slot, adapter) and tile each adapter's run; device ops only, no host sync.

    adapter_ids: [T, k] int (-1 = none). Returns (perm int32 [T*k], tile_adapter, tile_row0, tile_rend:
    int32 [k * tiles_per_slot]) and tiles_per_slot, a static bound: cdiv(T, BM) + min(L, T).
    Tile t of slot c lives at index c * tiles_per_slot + t; tile_adapter is -1 for surplus tiles.
    """
    t, k = adapter_ids.shape
    num = num_adapters
    dev = adapter_ids.device
    ids = adapter_ids.to(torch.int64)
    key = torch.where(ids >= 0, ids, num) + torch.arange(k, device=dev, dtype=torch.int64) * (num + 1)
    flat = key.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    counts = torch.zeros(k * (num + 1), dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    starts = (torch.cumsum(counts, 0) - counts).view(k, num + 1)[:, :num]
    counts = counts.view(k, num + 1)[:, :num]
    tiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 1)
    nt = triton.cdiv(t, block_m) + min(num, t)
    idx = torch.arange(nt, device=dev, dtype=torch.int64).expand(k, nt).contiguous()
    a = torch.searchsorted(cum, idx, right=True)
    valid = a < num
    a_c = a.clamp(max=num - 1)
    first = torch.gather(cum, 1, a_c) - torch.gather(tiles, 1, a_c)
    seg_start = torch.gather(starts, 1, a_c)
    row0 = seg_start + (idx - first) * block_m
    rend = seg_start + torch.gather(counts, 1, a_c)
    tile_adapter = torch.where(valid, a, -1)
    as32 = lambda v: v.reshape(-1).to(torch.int32).contiguous()
    return as32(perm), as32(tile_adapter), as32(row0), as32(rend), nt


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # no TF32 rounding for fp32 models


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


_BYTES_PER_PROGRAM = 32 * 1024  # bytes one shrink program streams before split-K cuts it


def _shrink_split(t: int, kdim: int, nt: int, num_slots: int, block_r: int, esize: int) -> int:
    """Split-K of the prefill/batch shrink, sized from the bytes each program streams.

    A tile streams its rows of x and its adapter's [BLOCK_R, K] slice of A: with many adapters
    and few tokens (decode-like batches, T=256 on 256 adapters: one row per tile) that is ~140 KB
    through one program, latency-bound, while counting programs (nt * slots = 260 ~ two waves)
    says the GPU is full. Splitting until a program streams ~32 KB (at most 8 ways, >= 256 K
    columns per split) keeps several loads in flight per SM. Above 256 tokens the tiles are full
    and the MMA work hides the latency: no split."""
    if t > 256:
        return 1
    rows = max(1, -(-t // max(1, nt)))  # tokens per tile on average (nt: an upper bound on the tiles)
    per_tile = kdim * esize * (min(rows, 64) + block_r)
    by_bytes = -(-per_tile // _BYTES_PER_PROGRAM)
    by_programs = max(1, _TARGET_PROGRAMS // max(1, num_slots * nt))
    return max(1, min(8, kdim // 256, max(by_bytes, by_programs)))


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights=None, *,
                      mode: str | None = None, split_k: int | None = None, block_m: int | None = None):
    """Validated, normalized inputs (see ``ops/multi_lora.py``): x [T, K]; weight [N, K] or None; bias [N] or None;
    lora_A [L, R, K]; lora_B [L, N, R]; scalings fp32 [L]; adapter_ids int [T, k]; ranks int32 [L];
    adapter_weights fp32 [T, k] or None. mode: None (auto), "fused" or "split" (tests force both)."""
    t, kdim = x.shape
    num, r_max, _ = lora_A.shape
    n = lora_B.shape[1]
    if weight is None:
        y = x.new_zeros((t, n)) if bias is None else bias.expand(t, n).clone()
    else:
        y = torch.nn.functional.linear(x, weight, bias).contiguous()
    num_slots = adapter_ids.shape[1]
    if t == 0 or num == 0 or r_max == 0 or num_slots == 0:
        return y
    if mode is None:
        mode = "fused" if t <= DECODE_MAX_TOKENS else "split"
    bm = block_m or (16 if t <= 64 else 64)
    perm, tile_adapter, tile_row0, tile_rend, nt = build_plan(adapter_ids, num, bm)
    w = adapter_weights.contiguous() if adapter_weights is not None else scalings  # dummy pointer when HAS_W=0
    has_w = adapter_weights is not None
    prec = _dot_prec(x.dtype)
    if mode == "fused":
        block_r, block_n = _pow2(r_max), 64
        n_split = max(1, min(triton.cdiv(n, block_n), _TARGET_PROGRAMS // max(1, nt)))
        n_per = triton.cdiv(triton.cdiv(n, n_split), block_n) * block_n
        n_split = triton.cdiv(n, n_per)
        for c in range(num_slots):
            _fused_kernel[(nt, n_split)](
                x, lora_A, lora_B, y, w, perm, tile_adapter, tile_row0, tile_rend, ranks, scalings,
                kdim, n, num_slots, c * nt, n_per,
                x.stride(0), x.stride(1), *lora_A.stride(), *lora_B.stride(), y.stride(0), y.stride(1), R=r_max,
                HAS_W=has_w, BLOCK_M=bm, BLOCK_R=block_r, BLOCK_K=64, BLOCK_N=block_n, DOT_PREC=prec,
                num_warps=_NUM_WARPS)
        return y
    if mode != "split":
        raise ValueError(f"mode must be None, 'fused' or 'split', got {mode!r}")
    block_r = 16 if r_max <= 16 else 32
    if split_k is None:
        split_k = _shrink_split(t, kdim, nt, num_slots, block_r, x.element_size())
    block_k = 64
    u = torch.empty((split_k, t * num_slots, r_max), dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_slots * nt, triton.cdiv(r_max, block_r), split_k)](
        x, lora_A, u, perm, tile_adapter, tile_row0, tile_rend, ranks, kdim, num_slots,
        x.stride(0), x.stride(1), *lora_A.stride(), u.stride(0), u.stride(1), R=r_max,
        BLOCK_M=bm, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k, DOT_PREC=prec, num_warps=_NUM_WARPS)
    block_n = 64
    for c in range(num_slots):
        _expand_kernel[(nt, triton.cdiv(n, block_n))](
            u, lora_B, y, w, perm, tile_adapter, tile_row0, tile_rend, ranks, scalings, n, num_slots, c * nt,
            *lora_B.stride(), y.stride(0), y.stride(1), u.stride(0), u.stride(1), R=r_max,
            HAS_W=has_w, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_R=block_r, SPLIT_K=split_k, DOT_PREC=prec,
            num_warps=_NUM_WARPS)
    return y
