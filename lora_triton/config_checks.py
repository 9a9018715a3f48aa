"""The field checks every adapter config class runs in ``validate`` (LoRA / DoRA, LoHa, LoKr, AdaLoRA, X-LoRA).

One rule set, so a value one config refuses is refused by all: a number is a Python int or float (bool and
strings refused: JSON ``"0.1"`` or ``true`` is a broken file), finite, and inside the field's range; an int
field holds an int (not a bool, not 2.0). Each failure is a ValueError naming the field, what was expected
and what came.
"""

from __future__ import annotations

import math
from typing import Optional


def show(value) -> str:
    """A value with its type, for error messages: ``str '16'``."""
    return f"{type(value).__name__} {value!r}"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def check_number(field: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a real, finite number, within [low, high] (an open end with ``low_open`` / ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{field} must be {_range_text(low, high, low_open, high_open)}, got {value!r}")


def check_probability(field: str, value) -> None:
    """A dropout probability: a number in [0, 1)."""
    check_number(field, value, 0.0, 1.0, high_open=True)


def check_int(field: str, value, minimum: int = 1) -> None:
    """An int (bool refused) >= ``minimum``."""
    if not is_int(value) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{field} must be {expected}, got {show(value)}")
