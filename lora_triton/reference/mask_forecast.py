"""Which dropout masks the next training step will ask for, so ``mask_memo`` can draw them in one batch.

On a small model every mask costs the generator's ~100 small ops of fixed overhead, and a step asks
for one mask per projection (a tiny Llama step: 14 masks in 8 generator calls, ~3 ms of a ~13 ms step).
The masks are a pure function of (seed, rows, cols, threshold, dtype), and the seeds the ops draw
(``ops/seeds.py``) are the next values of torch's generator. So at the first seed draw of a step, the
previous step's sequence of mask shapes (one entry per drawn seed, in draw order) and a *peek* at the
generator's next values (a copy of its state: nothing is consumed) say which masks this step will
need; ``mask_memo`` draws them in a few batched Philox calls and keeps them under their exact keys.

Nothing here can change a result: a forecast mask is used only when a later request has its very key
(same seed value, shape, threshold and dtype), and then has the bits a regeneration would give (the
batched generator is bit-identical to the per-mask one). A wrong forecast (another consumer of torch's
generator between the draws, a step that changed shape) costs only the wasted batch: the request misses
and regenerates. After ``MAX_STRIKES`` forecasts in which fewer than half the masks were used, this
thread stops forecasting.

A step boundary is "the first seed draw after a backward took a mask". Gradient accumulation (several
forwards, then their backwards) therefore forecasts the whole accumulated sequence. The record is
per thread and at most ``MAX_RECORD`` seeds long.
"""

from __future__ import annotations

import threading

MAX_RECORD = 512
MAX_STRIKES = 2


class Forecast:
    """One thread's record of the current step and what was forecast for it."""

    def __init__(self):
        self.prev: list = []  # the previous step: a mask shape (rows, cols, thr, dtype) or None per seed
        self.cur: list = []
        self.pos: dict[int, int] = {}  # seed value -> its index in ``cur``
        self.pending = False  # a backward took a mask: the next draw starts a step
        self.forecast: set = set()  # (seed, shape) drawn ahead for the current step
        self.used = 0
        self.strikes = 0

    def enabled(self) -> bool:
        return self.strikes < MAX_STRIKES

    def backward_seen(self) -> None:
        self.pending = True

    def on_draw(self, values: list[int], peek) -> list[tuple[int, tuple]]:
        """Records the drawn seed values; at a step start returns the (seed, shape) masks to draw ahead
        (``peek(k)``: the next k values the seed draw will produce, without consuming them)."""
        plan = []
        if self.pending:
            self.pending = False
            if self.forecast and 2 * self.used < len(self.forecast):
                self.strikes += 1
            self.prev, self.cur, self.pos, self.forecast, self.used = self.cur, [], {}, set(), 0
            if self.enabled() and any(s is not None for s in self.prev):
                upcoming = list(values[:len(self.prev)])
                if len(self.prev) > len(upcoming):
                    upcoming += peek(len(self.prev) - len(upcoming))
                plan = [(s, shape) for s, shape in zip(upcoming, self.prev) if shape is not None]
                self.forecast = set(plan)
        for v in values:
            if len(self.cur) < MAX_RECORD:
                self.pos[v] = len(self.cur)
                self.cur.append(None)
        return plan

    def on_mask(self, seed: int, shape: tuple) -> None:
        """A forward asked for the mask of ``seed`` with ``shape``: record it (and count a used forecast)."""
        j = self.pos.get(seed)
        if j is not None and self.cur[j] is None:
            self.cur[j] = shape
            if (seed, shape) in self.forecast:
                self.used += 1


_local = threading.local()


def state() -> Forecast:
    fc = getattr(_local, "forecast", None)
    if fc is None:
        fc = _local.forecast = Forecast()
    return fc


def reset() -> None:
    _local.forecast = Forecast()
