"""Small CPU dropout masks drawn once per training step: forward keeps the mask, backward takes it.

On small layers (a tiny Llama's M=64, K=256) the mask generator's cost is its ~100 small ops of fixed
overhead, not the elements, and regenerating it in backward doubled that. A mask is a pure function of
(seed, rows, cols, row offset, threshold, dtype), so keeping it under that key can never change a result:
a hit returns the very bits a regeneration would, a miss regenerates. Only masks that fit one generator
chunk (``philox._CHUNK`` counters: at most 256K elements, 1 MiB in fp32) are kept, the memo holds at most
``MAX_BYTES`` (oldest evicted first), and backward pops what it takes, so a forward without a backward
(evaluation in train mode) at worst leaves ``MAX_BYTES`` behind until later masks evict it. Large layers
and other devices always regenerate (0 bytes kept).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from . import philox

MAX_BYTES = 8 << 20

_memo: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_bytes = 0
_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _threshold(p: float) -> int:
    """``philox.dropout_threshold``, remembered: it builds and reads a tensor, a few microseconds per call,
    and a training step asks for the same few p's dozens of times."""
    return philox.dropout_threshold(p)


def _key(seed, rows: int, cols: int, p: float, dtype: torch.dtype, row_offset: int, device) -> tuple | None:
    """The memo key, or None when this mask is not kept (not CPU, or more than one generator chunk)."""
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    kind = device.type if isinstance(device, torch.device) else torch.device(device or "cpu").type
    if kind != "cpu" or rows * -(-cols // 8) > philox._CHUNK:
        return None
    s = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)  # one element: a CPU read, no sync
    return s, rows, cols, row_offset, _threshold(float(p)), dtype


def _put(key: tuple, keep: torch.Tensor) -> None:
    global _bytes
    size = keep.untyped_storage().nbytes()
    with _lock:
        old = _memo.pop(key, None)
        if old is not None:
            _bytes -= old.untyped_storage().nbytes()
        _memo[key] = keep
        _bytes += size
        while _bytes > MAX_BYTES and _memo:
            _bytes -= _memo.popitem(last=False)[1].untyped_storage().nbytes()


def _take(key: tuple, pop: bool = True) -> torch.Tensor | None:
    global _bytes
    with _lock:
        if not pop:
            return _memo.get(key)
        keep = _memo.pop(key, None)
        if keep is not None:
            _bytes -= keep.untyped_storage().nbytes()
    return keep


def prefill(seeds: torch.Tensor, rows: int, cols: int, ps, dtype: torch.dtype) -> None:
    """Draws the masks of G projections of one x (q, k, v; gate, up) in one batched Philox call and keeps
    them, so each projection's forward and backward find theirs: one call's ~100 small ops instead of G.
    Round keys and thresholds become [G, 1] tensors; every mask has exactly the bits of its own seed's
    stream. Does nothing off CPU, for fewer than two projections with dropout, or past one chunk."""
    idx = [g for g, p in enumerate(ps) if p > 0.0]
    groups = -(-cols // 8)
    if (len(idx) < 2 or seeds.device.type != "cpu" or rows == 0 or cols == 0
            or rows * groups * len(idx) > philox._CHUNK or MAX_BYTES == 0):
        return
    every = seeds.reshape(-1).tolist()
    seed_ints = [int(every[j]) for j in idx]
    g = len(idx)
    per_seed = [philox.round_keys(s) for s in seed_ints]  # [G][10][2] Python ints
    # One [10, 2, G, 1] tensor, split into the 10 rounds' (k0, k1) [G, 1] without a slice op per key.
    table = torch.tensor([[[[ks[i][w]] for ks in per_seed] for w in (0, 1)] for i in range(len(per_seed[0]))],
                         dtype=torch.int64)
    keys = list(zip(table[:, 0].unbind(0), table[:, 1].unbind(0)))
    n = rows * groups
    counters = torch.arange(n, dtype=torch.int64).expand(g, n).contiguous()  # row i, group j: i * G + j
    words = philox._Philox(g * n, "cpu").run(counters, keys, flip16=True)
    out, levels = philox.keep_buffers((g, rows, groups, 4, 2), dtype)
    thrs = [_threshold(float(ps[j])) for j in idx]
    thr16 = torch.tensor([t - 32768 for t in thrs], dtype=out.dtype if levels is None else levels.dtype)
    philox.keep_flags(words, out, levels, thr16.view(g, 1, 1, 1, 1))  # as in keep_mask_chunks, per seed
    for j, thr in enumerate(thrs):
        _put((seed_ints[j], rows, cols, 0, thr, dtype), out[j].view(rows, groups * 8)[:, :cols])


def clear() -> None:
    global _bytes
    with _lock:
        _memo.clear()
        _bytes = 0


def held_bytes() -> int:
    return _bytes


def mask_chunks(seed, rows: int, cols: int, p: float, device=None, dtype: torch.dtype = torch.bool,
                row_offset: int = 0, keep: bool = False, take: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``philox.keep_mask_chunks``, with small CPU masks kept (``keep``: forward) or taken (``take``:
    backward) under their key. A kept or taken mask is read-only for the caller."""
    key = _key(seed, rows, cols, p, dtype, row_offset, device) if (keep or take) and rows and cols else None
    if key is not None:
        hit = _take(key, pop=take)  # forward: a mask ``prefill`` drew; backward: the forward's
        if hit is not None:
            yield 0, rows, hit
            return
    for r0, r1, chunk in philox.keep_mask_chunks(seed, rows, cols, p, device, dtype, row_offset):
        if key is not None and keep:
            _put(key, chunk)  # the single chunk's buffer is this call's own: nothing reuses it
        yield r0, r1, chunk
