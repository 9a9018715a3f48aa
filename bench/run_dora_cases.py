"""Only the DoRA cases of ``lora-triton bench --suite train`` (the CLI has no case filter):
``python bench/run_dora_cases.py REPEATS OUT.json`` prints the table and writes the JSON document."""

from __future__ import annotations

import json
import os
import sys

import torch

from lora_triton.benchmark import report
from lora_triton.benchmark.cases import suite_cases
from lora_triton.benchmark.runner import RunSettings, collect_metadata, run_cases
from lora_triton.benchmark.shapes import parse_models


def main(argv: list[str]) -> int:
    repeats, out = int(argv[0]), argv[1]
    device = torch.device("cpu")
    cases = [c for c in suite_cases("train", parse_models("llama-8b"), cuda=False) if c.op == "dora_linear"]
    settings = RunSettings(device=device, repeats=repeats, warmup=1,
                           providers=("dora", "peft_dora", "lora_triton", "base"), ceilings=False,
                           log=lambda s: print(s, flush=True))
    meta = collect_metadata(device, ["bench/run_dora_cases.py", *argv])
    records, skipped = run_cases(cases, settings)
    meta["load_average_end"] = list(os.getloadavg())
    doc = report.build_document("train", meta, {}, cases, records, skipped)
    print(report.format_table(doc))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
