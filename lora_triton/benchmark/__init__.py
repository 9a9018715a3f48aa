"""Benchmark harness shared by ``lora-triton bench``, ``pytest bench/`` and ``bench/device_check.sh``.

Modules: ``stats`` (summary statistics), ``timing`` (interleaved CPU/CUDA timers, memory probes),
``roofline`` (analytic FLOP/byte model, device ceilings), ``shapes`` (real-model projections,
serving grid), ``providers`` / ``serve_providers`` (what is measured), ``cases`` (suites),
``runner`` (runs a suite), ``report`` (table, JSON, plot), ``cli`` (argument parsing).
Nothing here is imported at ``import lora_triton``; triton is only imported by the op on CUDA.
"""
