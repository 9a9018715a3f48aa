"""Triton kernel of the grouped LoRA op (G projections reading the same x).

``_grouped_shrink_kernel``: U_cat = [D_1(x) A_1^T | ... | D_G(x) A_G^T] [M, sum r_g] in one
   launch. Without dropout: one dot of each x tile against the concatenated A's (sum r_g <= 256
   per launch). With dropout: one program per (M tile, projection g), g fastest, so the G
   programs of an M tile run together and share each x tile through L2 (HBM reads x about
   once); program g regenerates its own mask (the stream of reference/philox.py, seed seeds[g]), the
   single-adapter kernels' mask for that seed, and writes U columns [roff[g], roff[g+1]).
   (A runtime loop over g inside one program, reusing the x tile in registers, spilled badly:
   the int64 Philox state of G seeds does not fit next to the tile.)

The backward reuses the single-adapter kernels; dx sums the projections with
``lora_bwd._dx_kernel(ACCUMULATE=True)`` (the fp32 accumulator starts from the dx tile already
written by the previous projection, so no temporaries).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lora_fwd import _shrink_block


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr, p_ptr, roff_ptr,
    M, K, R, G, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
    SPLIT_K,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    if HAS_DROPOUT:
        # Program (m tile, projection g) with g fastest: the G programs of one M tile run side by
        # side and stream the same x tiles, so x comes from HBM once and from L2 G - 1 times.
        g = pid % G
        pid_m = pid // G
        lo = tl.load(roff_ptr + g)
        hi = tl.load(roff_ptr + g + 1)
        p = tl.load(p_ptr + g)
        seed = tl.load(seed_ptr + g)
        rr = lo + tl.arange(0, R_PAD)
        r_ok = rr < hi
    else:
        # No mask: one dot against the concatenated A's covers every projection.
        pid_m = pid
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # The single-adapter shrink's tile loop (the masked tile as the MMA's B operand, so wgmma is not
    # serialized). Every projection of a dropout launch has p_g > 0 (the launcher splits off p_g == 0).
    if HAS_DROPOUT:
        _shrink_block(x_ptr, a_ptr, u_ptr, rows, row_ok, rr, r_ok, K, pid_s, SPLIT_K,
                      stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
                      seed, p, 1.0 / (1.0 - p), R_PAD, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_K)
    else:
        _shrink_block(x_ptr, a_ptr, u_ptr, rows, row_ok, rr, r_ok, K, pid_s, SPLIT_K,
                      stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
                      0, 0.0, 1.0, R_PAD, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_K)
