"""Pure-PyTorch twin of the grouped LoRA kernels (``kernels/grouped.py``): G projections of one x.

Shapes: x [M, K]; per projection g: weight [N_g, K] or None, bias [N_g] or None, lora_A [r_g, K],
lora_B [N_g, r_g], all in x's dtype; scalings / dropout_ps: G floats; seeds: int64 tensor [G] on
x's device (entry g unused when dropout_ps[g] == 0), or None when every p is 0.

Forward returns ([y_g], U_cat) with U_cat = [D_1(x) A_1^T | ... | D_G(x) A_G^T] [M, sum r_g]
(unscaled). Without dropout the shrink is one GEMM against the concatenated A's. Projection g's
mask is keep(i, j) = rand(seeds[g], i*K + j) > p_g, the mask ``lora_linear`` draws with that seed.
Backward returns (dx or None, [dA_g fp32], [dB_g fp32]), dx summed over the projections.
"""

from __future__ import annotations

import torch

from . import lora_linear as single
from . import mask_memo


def rank_offsets(lora_As) -> list[int]:
    offs = [0]
    for a in lora_As:
        offs.append(offs[-1] + a.shape[0])
    return offs


def _seed(seeds, g: int, p: float):
    return seeds[g:g + 1] if p > 0.0 else None


def lora_linear_grouped_fwd(x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds):
    offs = rank_offsets(lora_As)
    if all(p == 0.0 for p in dropout_ps):
        u_cat = x @ torch.cat(list(lora_As), 0).t()  # one shrink GEMM for all projections
    else:
        mask_memo.prefill(seeds, x.shape[0], x.shape[1], dropout_ps, x.dtype)  # small x: one Philox call for all G
        u_cat = torch.cat([single.shrink_dropout(x, a, p, seeds[g:g + 1]) if p > 0.0 else x @ a.t()
                           for g, (a, p) in enumerate(zip(lora_As, dropout_ps))], 1)
    ys = [single.base_plus_expand(x, w, b, u_cat[:, offs[g]:offs[g + 1]], lb, s)
          for g, (w, b, lb, s) in enumerate(zip(weights, biases, lora_Bs, scalings))]
    return ys, u_cat


def lora_linear_grouped_bwd(dys, x, weights, lora_As, lora_Bs, u_cat, scalings, dropout_ps, seeds,
                            need_dx: bool = True):
    offs = rank_offsets(lora_As)
    dx, d_as, d_bs = None, [], []
    for g, (dy, w, a, lb, s, p) in enumerate(zip(dys, weights, lora_As, lora_Bs, scalings, dropout_ps)):
        u = u_cat[:, offs[g]:offs[g + 1]]
        dx_g, d_a, d_b = single.lora_linear_bwd(dy, x, w, a, lb, u, s, p, _seed(seeds, g, p), need_dx)
        d_as.append(d_a)
        d_bs.append(d_b)
        if need_dx:
            dx = dx_g if dx is None else dx.add_(dx_g)
    return dx, d_as, d_bs
