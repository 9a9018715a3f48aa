"""``python -m lora_triton.benchmark.tiny_llama``: the per-round ratios to PEFT and a tiny end-to-end run."""

import json

import pytest

from lora_triton.benchmark.tiny_llama import main, paired_ratios


def test_paired_ratios_pair_samples_of_the_same_round():
    # Round i's two samples share its load: the ratio per round is 2.0 throughout, the medians' ratio is not.
    ours, peft = [2.0, 20.0, 4.0, 6.0, 8.0], [1.0, 10.0, 2.0, 3.0, 4.0]
    assert paired_ratios(ours, peft) == (2.0, 2.0, 2.0)
    assert paired_ratios([5.0, 1.0, 3.0, 2.0, 4.0], [1.0] * 5) == (3.0, 2.0, 4.0)


def test_tiny_run_writes_the_paired_ratios(tmp_path, capsys):
    pytest.importorskip("peft", reason="the benchmark compares against PEFT")
    out = tmp_path / "step.json"
    assert main(["--hidden", "64", "--layers", "1", "--tokens", "8", "--rank", "2", "--repeats", "2",
                 "--threads", "1", "--cpu-time", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["paired_x_peft"]) == {"lora_triton", "base", "peft"}
    assert doc["paired_x_peft"]["peft"] == {"median": 1.0, "p25": 1.0, "p75": 1.0}
    assert "per round: median" in capsys.readouterr().out


def test_paired_ratios_use_the_summary_percentiles():
    # An even count: the median is the mean of the middle two, as in summarize's median (not one of them).
    from lora_triton.benchmark.stats import percentile

    ours, peft = [1.0, 2.0, 3.0, 4.0], [1.0] * 4
    assert paired_ratios(ours, peft) == (2.5, percentile(ours, 25.0), percentile(ours, 75.0)) == (2.5, 1.75, 3.25)


def test_tiny_layer_run_has_every_provider(tmp_path):
    # --layer builds the same providers as the model (``_providers``) around one Linear.
    pytest.importorskip("peft", reason="the benchmark compares against PEFT")
    out = tmp_path / "layer.json"
    assert main(["--layer", "--hidden", "32", "--tokens", "4", "--rank", "2", "--repeats", "2", "--threads", "1",
                 "--custom-op", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["stats"]) == {"lora_triton", "base", "peft", "lora_triton_custom_op"}
