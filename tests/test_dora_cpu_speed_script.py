"""bench/dora_cpu_speed.py times through the benchmark harness (interleaved timer, harness median) and runs
end to end at a tiny size (smoke only: speed is never asserted in tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dora_cpu_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("dora_cpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_time_through_the_harness(monkeypatch, capsys):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")  # what the script sets; restored after the test
    script = _load_script()
    calls = []
    harness = script.measure_interleaved

    def recording(fns, device, repeats, warmup, n_sets=1):
        calls.append((sorted(fns), device.type, repeats, warmup))
        return harness(fns, device, repeats, warmup, n_sets)

    monkeypatch.setattr(script, "measure_interleaved", recording)
    threads = torch.get_num_threads()
    try:
        assert script.main(["ratios", "1", "2", "16"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    assert calls == [(["dora", "frozen", "lora", "peft_dora"], "cpu", 2, 1)] * 2  # p = 0 and 0.1
    out = capsys.readouterr().out
    assert "K=N=16 p=0.0" in out and "K=N=16 p=0.1" in out and "dora/peft" in out
