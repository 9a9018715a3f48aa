"""Launchers of the grouped LoRA kernels; same signatures as ``reference/grouped.py``.

Forward: one grouped shrink launch for all projections (per-projection dropout masks, see
``grouped_kernels.py``; without dropout, packed into launches of at most 256 total rank), then
per projection the single-adapter base GEMM with the expand folded in, reading its U columns
as a strided view of U_cat (G + 1 launches instead of 2G).
Backward, per projection: the single-adapter dU/dB and dA kernels on its U columns, and the
dgrad kernel accumulating into one dx buffer (the first projection stores, the others add).
"""

from __future__ import annotations

import functools

import torch
import triton

from ..reference.grouped import rank_offsets
from . import autotune as at
from . import gemm_launch as gl
from .grouped_kernels import _grouped_shrink_kernel
from .lora_linear import _check, _empty, _nominal, _r_pad, _split, dudb_da

_MAX_R_LAUNCH = 256  # total rank one grouped shrink launch accumulates in registers


@functools.cache
def _tuned(name: str):
    return at.tuned(_grouped_shrink_kernel, "shrink", ["M_BUCKET", "K", "R"], "x_ptr")


def _launch_own(name: str, kernel, family: str, tensor_arg: str, grid, *args, **kwargs):
    at.launch(kernel, family, tensor_arg, lambda: _tuned(name), grid, *args, **kwargs)


def _chunks(ranks, drops=None) -> list[tuple[int, int, bool]]:
    """Launches of the grouped shrink: (first, end, dropout) over runs of consecutive projections
    with the same dropout flag; runs without dropout are packed so each launch's total rank stays
    <= 256 (with dropout each program covers one projection, so any run fits one launch)."""
    drops = [False] * len(ranks) if drops is None else list(drops)
    out, start, total = [], 0, 0
    for g, r in enumerate(ranks):
        if g > start and (drops[g] != drops[start] or (not drops[g] and total + r > _MAX_R_LAUNCH)):
            out.append((start, g, drops[start]))
            start, total = g, 0
        total += r
    out.append((start, len(ranks), drops[start]))
    return out


@functools.lru_cache(maxsize=64)
def _meta(ps: tuple, roffs: tuple, device: torch.device):
    """Per-launch p [G] fp32 and rank offsets [G+1] int32 on the device, built once per combination."""
    return (torch.tensor(ps, dtype=torch.float32, device=device),
            torch.tensor(roffs, dtype=torch.int32, device=device))


def _seed_g(seeds, g: int, p: float):
    return seeds[g:g + 1] if p > 0.0 else None


def _shrink(x, lora_As, u_cat, offs, dropout_ps, seeds):
    m, k = x.shape
    dev, ieee, mb = x.device, x.dtype == torch.float32, at.m_bucket(m)
    ranks = [a.shape[0] for a in lora_As]
    split = _split(triton.cdiv(m, _nominal("M")), triton.cdiv(k, _nominal("K")), dev)
    for g0, g1, drop in _chunks(ranks, [p > 0.0 for p in dropout_ps]):
        a_cat = lora_As[g0] if g1 - g0 == 1 else torch.cat(lora_As[g0:g1], 0)
        r = offs[g1] - offs[g0]
        u = u_cat[:, offs[g0]:offs[g1]]
        ps = tuple(float(p) for p in dropout_ps[g0:g1])
        p_t, roff_t = _meta(ps, tuple(o - offs[g0] for o in offs[g0:g1 + 1]), dev)
        progs = g1 - g0 if drop else 1
        u_out = u if split == 1 else _empty((split, m, r), torch.float32, dev)
        us = (0, u.stride(0), u.stride(1)) if split == 1 else u_out.stride()
        grid = lambda META, progs=progs: (triton.cdiv(m, META["BLOCK_M"]) * progs, split)
        _launch_own("gshrink", _grouped_shrink_kernel, "shrink", "x_ptr", grid,
                    x, a_cat, u_out, seeds[g0:g1] if drop else x, p_t, roff_t, m, k, r, g1 - g0, mb,
                    x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), *us, split,
                    R_PAD=_r_pad(max(ranks[g0:g1]) if drop else r), HAS_DROPOUT=drop, IEEE=ieee)
        if split > 1:
            u.copy_(u_out.sum(0))


def lora_linear_grouped_fwd(x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds):
    lora_As, lora_Bs = list(lora_As), list(lora_Bs)
    for g, (w, b, a, lb, p) in enumerate(zip(weights, biases, lora_As, lora_Bs, dropout_ps)):
        _check(x, w, b, a, lb, p, _seed_g(seeds, g, p))
    m, k = x.shape
    dev, dt = x.device, x.dtype
    offs = rank_offsets(lora_As)
    u_cat = _empty((m, offs[-1]), dt, dev)
    ys = [_empty((m, lb.shape[0]), dt, dev) for lb in lora_Bs]
    if m == 0:
        return ys, u_cat
    _shrink(x, lora_As, u_cat, offs, dropout_ps, seeds)
    mb = at.m_bucket(m)
    for g, (w, b, lb, s, y) in enumerate(zip(weights, biases, lora_Bs, scalings, ys)):
        gl.fwd_gemm(x, w, b, u_cat[:, offs[g]:offs[g + 1]], lb, y, s, _r_pad(lb.shape[1]), mb)
    return ys, u_cat


def lora_linear_grouped_bwd(dys, x, weights, lora_As, lora_Bs, u_cat, scalings, dropout_ps, seeds,
                            need_dx: bool = True):
    """Returns (dx or None, [dA_g fp32 [r_g, K]], [dB_g fp32 [N_g, r_g]])."""
    m, k = x.shape
    offs = rank_offsets(lora_As)
    if u_cat.shape != (m, offs[-1]) or u_cat.dtype != x.dtype:
        raise ValueError(f"u_cat must be [{m}, {offs[-1]}] in {x.dtype}, got {tuple(u_cat.shape)} {u_cat.dtype}")
    for g, (dy, w, a, lb, p) in enumerate(zip(dys, weights, lora_As, lora_Bs, dropout_ps)):
        _check(x, w, None, a, lb, p, _seed_g(seeds, g, p))
        if dy.shape != (m, lb.shape[0]) or dy.dtype != x.dtype:
            raise ValueError(f"dys[{g}] must be [{m}, {lb.shape[0]}] in {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    dev, dt = x.device, x.dtype
    dx = _empty((m, k), dt, dev) if need_dx else None
    if m == 0:
        d_as = [torch.zeros(a.shape, dtype=torch.float32, device=dev) for a in lora_As]
        d_bs = [torch.zeros(b.shape, dtype=torch.float32, device=dev) for b in lora_Bs]
        if dx is not None:
            dx.zero_()
        return dx, d_as, d_bs
    d_as, d_bs = [], []
    for g, (dy, w, a, lb, s, p) in enumerate(zip(dys, weights, lora_As, lora_Bs, scalings, dropout_ps)):
        seed = _seed_g(seeds, g, p)
        # dA from the dgrad epilogue's mask tiles (one mask per projection).
        fuse = need_dx and p > 0.0 and gl.fuse_da_ok(dev, _r_pad(a.shape[0]))
        d_u, d_a, d_b = dudb_da(dy, x, lb, u_cat[:, offs[g]:offs[g + 1]], s, float(p), seed, with_da=not fuse)
        if fuse:
            d_a = torch.zeros(a.shape, dtype=torch.float32, device=dev)
        d_as.append(d_a)
        d_bs.append(d_b)
        if need_dx:
            gl.dgrad(dy, w, d_u, a, seed, dx, float(p), _r_pad(a.shape[0]), at.m_bucket(m), accumulate=g > 0,
                     x=x if fuse else None, d_a=d_a if fuse else None)
    return dx, d_as, d_bs
