"""bench/serve_cpu_overhead.py: the harness's percentiles and a clear error for a token count it lacks (its
timing is never run in tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_triton.benchmark.stats import summarize

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve_cpu_overhead.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("serve_cpu_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stats_are_the_harness_percentiles():
    values = [4.0, 1.0, 3.0, 2.0]
    s = summarize(values)
    assert _load_script()._stats(values) == {"median": 2.5, "p20": s.p20_s, "p80": s.p80_s}
    assert (s.p20_s, s.p80_s) == (1.6, 3.4)


def test_unknown_token_count_names_the_ones_there_are():
    with pytest.raises(SystemExit, match=r"--tokens 100: the serve cases have \[64, 256\] tokens"):
        _load_script().measure(100, rounds=1)
