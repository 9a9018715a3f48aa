"""bench/serve_cpu_overhead.py summarizes with the harness's percentiles (its timing is never run in tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lora_triton.benchmark.stats import summarize

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve_cpu_overhead.py"


def test_stats_are_the_harness_percentiles():
    spec = importlib.util.spec_from_file_location("serve_cpu_overhead", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    values = [4.0, 1.0, 3.0, 2.0]
    s = summarize(values)
    assert script._stats(values) == {"median": 2.5, "p20": s.p20_s, "p80": s.p80_s}
    assert (s.p20_s, s.p80_s) == (1.6, 3.4)
