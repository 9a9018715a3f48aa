"""Philox4x32-10 in PyTorch, bit-identical to Triton's ``tl.randint4x`` / ``tl.rand``.

Dropout masks are a pure function of (seed, offset), so the reference path, the
Triton kernels, forward and backward all regenerate the same mask without ever
storing it.

The mask stream of a [rows, K] input: row i is cut into G = ceil(K / 8) groups of 8
columns; group g draws ``tl.randint4x(seed, i * G + g)`` (int64 counter) and column
j = 8g + l takes 16 bits of it: word ``l >> 1``, low half for even l, high half for odd l.
It is kept when those bits are >= ``dropout_threshold(p)``. Groups never straddle rows,
so a kernel tile whose columns start at a multiple of 8 runs one Philox per 8 elements,
and so does this reference: the mask costs an eighth of a Philox call per element.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
# Triton's uint_to_uniform_float scale for 32-bit words.
_UNIFORM_SCALE = 4.6566127342e-10


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # uint32 values held in int64: the 64-bit product may wrap, bits 32..63 survive.
    return ((b * a) >> 32) & _MASK32


def round_keys(seed: torch.Tensor | int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 10 (k0, k1) round keys of a seed, as 0-d int64 tensors (no host sync for tensor seeds)."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64, device=device)
    seed = seed.to(device=device, dtype=torch.int64).reshape(())
    steps = torch.arange(10, dtype=torch.int64, device=seed.device)
    k0 = ((seed & _MASK32) + steps * _KEY_A) & _MASK32
    k1 = (((seed >> 32) & _MASK32) + steps * _KEY_B) & _MASK32
    return list(zip(k0.unbind(), k1.unbind()))


def philox4x32(seed: torch.Tensor | int, offsets: torch.Tensor, keys=None) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 (``tl.randint4x``); uint32 values held in int64.

    ``keys`` (from ``round_keys``) saves recomputing them when one seed serves many chunks.
    """
    offsets = offsets.to(torch.int64)
    keys = round_keys(seed, offsets.device) if keys is None else keys
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    # Round 1 with c2 = c3 = 0 (umulhi(B, 0) = 0 and B * 0 = 0).
    k0, k1 = keys[0]
    c0, c1, c2, c3 = c1 ^ k0, torch.zeros_like(c0), _umulhi(_ROUND_A, c0) ^ k1, (c0 * _ROUND_A) & _MASK32
    for k0, k1 in keys[1:]:
        new_c0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        new_c2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _ROUND_B) & _MASK32
        c3 = (c0 * _ROUND_A) & _MASK32
        c0, c2 = new_c0, new_c2
    return c0, c1, c2, c3


def philox_randint(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first Philox word."""
    return philox4x32(seed, offsets)[0]


def philox_rand(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1), equal bit for bit to ``tl.rand(seed, offsets)``."""
    word = philox_randint(seed, offsets)
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_threshold(p: float) -> int:
    """16-bit threshold of the mask stream, computed in fp32 exactly as the kernels do."""
    p32 = torch.tensor(float(p), dtype=torch.float32)
    return int(p32 * 65536.0 + 0.5)


# Philox counters per chunk (about): large enough that per-op overhead stops dominating (2048 x
# 4096 mask: 89 ms at 4K counters, 34 ms at 64K on 2 idle cores), small enough for the cache.
_CHUNK = 1 << 16


def _keep_groups(keys, counters: torch.Tensor, thr: int) -> torch.Tensor:
    """[..., G] counters -> [..., 8 * G] keep flags, lane 2 * word + half."""
    words = torch.stack(philox4x32(None, counters, keys), dim=-1)  # [..., G, 4]
    # Compare before interleaving, so only bools get copied.
    keep = torch.stack(((words & 0xFFFF) >= thr, (words >> 16) >= thr), dim=-1)  # [..., G, 4, 2]
    return keep.reshape(*counters.shape[:-1], -1)


def dropout_keep_mask(
    seed: torch.Tensor | int, rows: int, cols: int, p: float, device=None, row_offset: int = 0
) -> torch.Tensor:
    """Boolean keep mask [rows, cols] of the mask stream (module docstring), for rows
    row_offset .. row_offset + rows - 1 of an input with ``cols`` columns."""
    if isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
    keep = torch.empty((rows, cols), dtype=torch.bool, device=device)
    if rows == 0 or cols == 0:
        return keep
    thr = dropout_threshold(p)
    keys = round_keys(seed, device)
    groups = -(-cols // 8)
    gidx = torch.arange(groups, device=device, dtype=torch.int64)
    step = max(1, _CHUNK // groups) if torch.device(device or "cpu").type == "cpu" else rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        ridx = torch.arange(row_offset + r0, row_offset + r1, device=device, dtype=torch.int64)
        keep[r0:r1] = _keep_groups(keys, ridx[:, None] * groups + gidx[None, :], thr)[:, :cols]
    return keep


def apply_dropout(x: torch.Tensor, seed: torch.Tensor | int, p: float, keep: torch.Tensor | None = None):
    """D(x) = x * mask / (1 - p) for a 2-D x, mask regenerated from the seed (or given)."""
    if p == 0.0:
        return x
    if keep is None:
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return x * keep * (1.0 / (1.0 - p))
