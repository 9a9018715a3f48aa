"""Small CPU dropout masks drawn once per training step: forward keeps the mask, backward takes it.

On small layers (a tiny Llama's M=64, K=256) the mask generator's cost is its ~100 small ops of fixed
overhead, not the elements, and regenerating it in backward doubled that. A mask is a pure function of
(seed, rows, cols, row offset, threshold, dtype), so keeping it under that key can never change a result:
a hit returns the very bits a regeneration would, a miss regenerates. Only small masks (at most
``philox.small_mask_counters()`` counters, 256K elements, 1 MiB in fp32: within one generator chunk) are kept,
the memo holds at most ``MAX_BYTES`` (oldest evicted first), and backward pops what it takes, so a forward
without a backward (evaluation in train mode) at worst leaves ``MAX_BYTES`` behind until later masks evict
it. Large layers and other devices always regenerate (0 bytes kept).

Masks are drawn in batches where that is known to be right: ``prefill`` draws the G projections of one x
(q/k/v, gate/up) together, and ``seeds_drawn`` draws at a step's first seed the masks the step will ask for
(``mask_forecast``: the previous step's mask shapes, the generator's next values), in one Philox call per
shape. Either way each mask has the bits of its own seed's stream, kept under its exact key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from . import mask_forecast, philox

MAX_BYTES = 8 << 20

_memo: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_bytes = 0
_lock = threading.Lock()


def _key(seed, rows: int, cols: int, p: float, dtype: torch.dtype, row_offset: int, device) -> tuple | None:
    """The memo key, or None when this mask is not kept (not CPU, or not small: ``_fits``)."""
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    kind = device.type if isinstance(device, torch.device) else torch.device(device or "cpu").type
    if kind != "cpu" or not _fits(rows, cols):
        return None
    s = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)  # one element: a CPU read, no sync
    return _memo_key(s, rows, cols, philox.dropout_threshold(p), dtype, row_offset)


def _memo_key(seed: int, rows: int, cols: int, thr: int, dtype: torch.dtype, row_offset: int = 0) -> tuple:
    """The one layout of a memo key (a batch's puts and the lookups must agree on it)."""
    return seed, rows, cols, row_offset, thr, dtype


def _counters(rows: int, cols: int) -> int:
    """Philox counters of a [rows, cols] mask: one per 8 columns of a row."""
    return rows * -(-cols // 8)


def _nbytes(keep: torch.Tensor) -> int:
    return keep.numel() * keep.element_size()  # its share of a batch's buffer (``_draw_batch``)


def _put(key: tuple, keep: torch.Tensor) -> None:
    _put_many([(key, keep)])


def _put_many(items: list[tuple[tuple, torch.Tensor]]) -> None:
    """Keeps each (key, mask), replacing an older mask of the key; evicts the oldest past ``MAX_BYTES``."""
    global _bytes
    with _lock:
        for key, keep in items:
            old = _memo.pop(key, None)
            if old is not None:
                _bytes -= _nbytes(old)
            _memo[key] = keep
            _bytes += _nbytes(keep)
        while _bytes > MAX_BYTES and _memo:
            _bytes -= _nbytes(_memo.popitem(last=False)[1])


def _take(key: tuple, pop: bool = True) -> torch.Tensor | None:
    global _bytes
    with _lock:
        if not pop:
            return _memo.get(key)
        keep = _memo.pop(key, None)
        if keep is not None:
            _bytes -= _nbytes(keep)
    return keep


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}  # (G, n) -> arange(n) per seed: read-only, reused


def _batch_counters(g: int, n: int) -> torch.Tensor:
    """int64 [G, n], row g = 0 .. n-1 (mask row i, group j: i * groups + j); cached (``run`` only reads it)."""
    counters = _COUNTERS.get((g, n))
    if counters is None:
        if len(_COUNTERS) >= 16:
            _COUNTERS.clear()
        with torch.inference_mode(False):  # usable by a later call outside inference mode
            counters = _COUNTERS[(g, n)] = torch.arange(n, dtype=torch.int64).expand(g, n).contiguous()
    return counters


def _draw_batch(seed_ints: list[int], rows: int, cols: int, thrs: list[int], dtype: torch.dtype) -> None:
    """Draws and keeps the [rows, cols] masks of G seeds (thresholds ``thrs``) in one batched Philox call
    (G * rows * ceil(cols / 8) counters, at most one chunk): round keys and thresholds become [G, 1]
    tensors (one threshold shared by all stays a number), and every mask has exactly the bits of its own
    seed's stream."""
    g, groups = len(seed_ints), -(-cols // 8)
    n = rows * groups
    words = philox.generator(g * n, "cpu").run(_batch_counters(g, n), philox.batch_round_keys(seed_ints), flip16=True,
                                               below_2_32=n <= 1 << 32)
    out, levels = philox.keep_buffers((g, rows, groups, 4, 2), dtype)
    if all(t == thrs[0] for t in thrs):
        thr16 = thrs[0] - 32768  # exact as a number: the same flags as a tensor of it
    else:
        thr16 = torch.tensor([t - 32768 for t in thrs], dtype=out.dtype if levels is None else levels.dtype)
        thr16 = thr16.view(g, 1, 1, 1, 1)
    philox.keep_flags(words, out, levels, thr16)  # as in keep_mask_chunks, per seed
    masks = out.view(g, rows, groups * 8)
    if groups * 8 != cols:
        masks = masks[:, :, :cols]
    _put_many([(_memo_key(seed_ints[j], rows, cols, thr, dtype), keep) for j, (thr, keep) in
               enumerate(zip(thrs, masks.unbind(0)))])


def _fits(rows: int, cols: int) -> bool:
    return 0 < _counters(rows, cols) <= philox.small_mask_counters()  # 0 < : rows and cols both > 0


def prefill(seeds: torch.Tensor, rows: int, cols: int, ps, dtype: torch.dtype) -> None:
    """Draws the masks of G projections of one x (q, k, v; gate, up) in one batched Philox call and keeps
    them, so each projection's forward and backward find theirs: one call's ~100 small ops instead of G.
    Masks already kept (a forecast drew them) are not drawn again. Does nothing off CPU, for fewer than two
    projections with dropout, or past one chunk."""
    idx = [g for g, p in enumerate(ps) if p > 0.0]
    if (len(idx) < 2 or seeds.device.type != "cpu" or not _fits(rows, cols)
            or _counters(rows, cols) * len(idx) > philox._CHUNK or MAX_BYTES == 0):
        return
    every = seeds.reshape(-1).tolist()
    todo = []
    for j in idx:  # the forecast hears of each mask from its projection's own ``small_mask`` call
        seed, thr = int(every[j]), philox.dropout_threshold(ps[j])
        if _memo_key(seed, rows, cols, thr, dtype) not in _memo:
            todo.append((seed, thr))
    if len(todo) > 1:  # a single one is drawn by its projection's own forward
        _draw_batch([t[0] for t in todo], rows, cols, [t[1] for t in todo], dtype)


def seeds_drawn(seeds: torch.Tensor, peek) -> None:
    """``ops/seeds.py`` drew ``seeds`` (CPU, eager): record them, and at a step start draw the masks the
    forecast expects this step to ask for (``mask_forecast``), batched per shape, within ``MAX_BYTES // 2``."""
    if MAX_BYTES == 0:
        return
    plan = mask_forecast.state().on_draw(seeds.tolist(), peek)  # int64: Python ints already
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    budget = MAX_BYTES // 2
    for seed, (rows, cols, thr, dtype) in plan:
        size = rows * cols * dtype.itemsize
        if not _fits(rows, cols) or size > budget or _memo_key(seed, rows, cols, thr, dtype) in _memo:
            continue
        budget -= size
        by_shape.setdefault((rows, cols, dtype), []).append((seed, thr))
    for (rows, cols, dtype), todo in by_shape.items():
        per_call = max(1, philox._CHUNK // _counters(rows, cols))
        for i in range(0, len(todo), per_call):
            part = todo[i:i + per_call]
            _draw_batch([t[0] for t in part], rows, cols, [t[1] for t in part], dtype)


def clear() -> None:
    """Empties the memo and this thread's forecast."""
    global _bytes
    with _lock:
        _memo.clear()
        _bytes = 0
    mask_forecast.reset()


def held_bytes() -> int:
    return _bytes


def _held_mask(key: tuple, seed, rows: int, cols: int, p: float, device, dtype: torch.dtype, row_offset: int,
               keep: bool, take: bool) -> torch.Tensor:
    """The whole small mask under ``key``: the kept one (popped with ``take``: backward), else drawn (one
    chunk, ``_fits``) and kept with ``keep`` (forward). Tells the forecast which mask or backward it saw."""
    fc = mask_forecast.state()
    if keep:
        fc.on_mask(key[0], (rows, cols, key[4], dtype))
    else:
        fc.backward_seen()
    hit = _take(key, pop=take)  # forward: a mask ``prefill`` or a forecast drew; backward: the forward's
    if hit is None:
        (_, _, hit), = philox.keep_mask_chunks(seed, rows, cols, p, device, dtype, row_offset)  # small: one chunk
        if keep:
            _put(key, hit)  # the single chunk's buffer is this call's own: nothing reuses it
    return hit


def small_mask(seed, rows: int, cols: int, p: float, device, dtype: torch.dtype, forward: bool) -> torch.Tensor | None:
    """The whole [rows, cols] mask of a small CPU mask (one chunk, ``_fits``), else None (the caller loops
    over ``philox.keep_mask_chunks``: nothing else is kept). Forward keeps it for its backward (a kept one,
    drawn by a batch, is taken without popping); backward pops it. ``mask_chunks(keep=forward, take=not
    forward)``'s single chunk, without the iterator: a small layer's call pays per Python frame. Read-only
    for the caller."""
    key = _key(seed, rows, cols, p, dtype, 0, device)
    return None if key is None else _held_mask(key, seed, rows, cols, p, device, dtype, 0, forward, not forward)


def mask_chunks(seed, rows: int, cols: int, p: float, device=None, dtype: torch.dtype = torch.bool,
                row_offset: int = 0, keep: bool = False, take: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``philox.keep_mask_chunks``, with small CPU masks kept (``keep``: forward) or taken (``take``:
    backward) under their key. A kept or taken mask is read-only for the caller."""
    key = _key(seed, rows, cols, p, dtype, row_offset, device) if keep or take else None  # None: empty too
    if key is not None:
        yield 0, rows, _held_mask(key, seed, rows, cols, p, device, dtype, row_offset, keep, take)
        return
    yield from philox.keep_mask_chunks(seed, rows, cols, p, device, dtype, row_offset)
