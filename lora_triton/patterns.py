"""Regular expressions from adapter configs, checked up front and matched with a time limit.

Config patterns (``target_modules`` as a string, ``exclude_modules``, ``rank_pattern`` /
``alpha_pattern`` keys, ``layers_pattern``, ``modules_to_save``) come from files anyone can write.
They are compiled with Python's ``re`` when the config is validated, so a bad one is a clear
``ValueError`` naming the field, and matched with the ``regex`` package (re-compatible syntax and
semantics) under a time limit, so a catastrophically backtracking pattern (``(a|aa)+b``) is a
``ValueError`` after ``MATCH_TIMEOUT_S`` instead of a loader that never returns (PEFT hangs there).
"""

from __future__ import annotations

import functools
import re

import regex

# Module paths are short: an honest pattern matches one in microseconds; a second means backtracking.
MATCH_TIMEOUT_S = 1.0


def check_pattern(field: str, pattern) -> None:
    """Raise ValueError unless ``pattern`` is a string Python's ``re`` compiles."""
    if not isinstance(pattern, str):
        raise ValueError(f"{field}: expected a regular expression (str), got {type(pattern).__name__} {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{field}: invalid regular expression {pattern!r}: {exc}") from None


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return regex.compile(pattern)


def _run(kind: str, pattern: str, string: str, field: str):
    try:
        return getattr(_compiled(pattern), kind)(string, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(f"{field}: pattern {pattern!r} took over {MATCH_TIMEOUT_S} s to match the module name "
                         f"{string!r} (catastrophic backtracking: nested or overlapping quantifiers such as "
                         "'(a|aa)+' or '(a+)+'); simplify the pattern") from None


def match(pattern: str, string: str, field: str):
    """``re.match`` semantics, bounded in time; ``field`` names the config field in the error."""
    return _run("match", pattern, string, field)


def fullmatch(pattern: str, string: str, field: str):
    """``re.fullmatch`` semantics, bounded in time; ``field`` names the config field in the error."""
    return _run("fullmatch", pattern, string, field)
