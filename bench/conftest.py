"""pytest-benchmark suite (``pytest bench/ --benchmark-only``): the CPU cases of the harness.

Not part of the default test run (pyproject testpaths = ["tests"]). ``BENCH_SCALE=small``
shrinks the shapes for a smoke run.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

SMALL = os.environ.get("BENCH_SCALE", "full") == "small"
