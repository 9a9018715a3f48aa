"""Summary statistics of timing samples: median with p20/p80, robust to the odd slow repeat."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default 'linear' method), q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Seconds. ``n`` = number of timed repeats (warm-up excluded)."""

    median_s: float
    p20_s: float
    p80_s: float
    mean_s: float
    min_s: float
    max_s: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float]) -> Stats:
    if not samples:
        raise ValueError("no timing samples to summarize")
    return Stats(
        median_s=percentile(samples, 50.0),
        p20_s=percentile(samples, 20.0),
        p80_s=percentile(samples, 80.0),
        mean_s=sum(samples) / len(samples),
        min_s=min(samples),
        max_s=max(samples),
        n=len(samples),
    )
