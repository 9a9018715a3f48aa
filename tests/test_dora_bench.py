"""The DoRA benchmark cases: listed in ``--suite train``, every provider runs, saved-for-backward ordering.
(Speed is shown by ``lora-triton bench``, never asserted here.)"""

from __future__ import annotations

import pytest
import torch

from lora_triton.benchmark import report
from lora_triton.benchmark.cases import Case, suite_cases
from lora_triton.benchmark.dora_cases import DORA_PROVIDERS, build_dora_providers
from lora_triton.benchmark.runner import RunSettings, collect_metadata, run_cases
from lora_triton.benchmark.shapes import parse_models
from lora_triton.benchmark.timing import saved_tensor_bytes

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def test_train_suite_lists_dora_at_two_widths_and_the_gpu_goal():
    cpu = [c for c in suite_cases("train", parse_models("llama-8b"), cuda=False) if c.op == "dora_linear"]
    assert {(c.tokens, c.in_features, c.out_features, c.rank, c.dropout_p, c.dtype) for c in cpu} == {
        (2048, w, w, 16, p, "float32") for w in (1024, 4096) for p in (0.0, 0.1)}
    gpu = [c for c in suite_cases("train", parse_models("llama-8b"), cuda=True) if c.op == "dora_linear"]
    assert {(c.tokens, c.in_features, c.rank, c.dropout_p, c.dtype) for c in gpu} == {
        (8192, 4096, 16, p, "bfloat16") for p in (0.0, 0.1)}


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_providers_agree_and_ours_saves_less(p):
    case = Case("t", "dora_linear", "fwd+bwd", "t", 64, 96, 80, 4, "float32", dropout_p=p)
    providers, skipped = build_dora_providers(case, CPU, list(DORA_PROVIDERS), 1)
    assert not skipped and [q.name for q in providers] == list(DORA_PROVIDERS)
    by = {q.name: q for q in providers}
    if p == 0.0:  # same weights and inputs: the two DoRA providers compute the same gradients
        ours, theirs = by["dora"].fn(0), by["peft_dora"].fn(0)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    saved = {q.name: saved_tensor_bytes(q.fn, 0, q.exclude) for q in providers}
    assert saved["dora"] <= (64 * 80 + 64 * 4 + 80) * 4 + 64  # y_pre, U, the norm, the seed
    assert saved["dora"] * (4 if p else 2) <= saved["peft_dora"]


def test_dora_cases_through_the_runner_and_the_report(tmp_path):
    """The train suite's DoRA cases (tiny shapes) through the CLI's runner, schema-checked JSON, table."""
    cases = [c for c in suite_cases("train", parse_models("tiny"), cuda=False) if c.op == "dora_linear"][:1]
    settings = RunSettings(device=CPU, repeats=1, warmup=0, providers=DORA_PROVIDERS, ceilings=False,
                           log=lambda s: None)
    records, skipped = run_cases(cases, settings)
    meta = collect_metadata(CPU, ["test"])
    meta["load_average_end"] = meta["load_average"]
    report.write_json(report.build_document("train", meta, {}, cases, records, skipped), tmp_path / "t.json")
    doc = report.load_json(tmp_path / "t.json")  # validates the schema
    assert {r["provider"] for r in doc["results"]} == set(DORA_PROVIDERS) and not doc["skipped"]
    assert all(r["op"] == "dora_linear" and r["memory"]["kind"] == "saved_for_backward" for r in doc["results"])
    assert "peft_dora" in report.format_table(doc)
