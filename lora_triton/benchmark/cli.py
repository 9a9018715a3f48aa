"""``lora-triton bench``: run a suite, print the table, write JSON and a plot.

    lora-triton bench [--suite quick|train|serve|all|grid] [--device cpu|cuda] [--dtype ...]
                      [--shapes llama-8b[,qwen2.5-7b]|all|tiny] [--json out.json] [--plot out.png]
    python -m lora_triton.benchmark.cli --from-json out.json [--plot out.png]   # re-print / re-plot
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .cases import SUITES, select_cases, suite_cases
from .shapes import MODELS, parse_models

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-triton bench", description=(
        "Time lora_triton's ops against the unfused PyTorch composition, PEFT's layer, torch.compile and "
        "the frozen base layer, interleaved in one process. 'quick' runs on CPU in under a minute."))
    p.add_argument("--suite", choices=SUITES, default="quick",
                   help="quick (default): small CPU-friendly set; train: LoRA training layer; serve: mixed "
                        "adapter batches; all: train + serve; grid: the whole serving grid (long)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="override the suite's dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shapes", default="llama-8b",
                   help=f"model shapes, comma-separated: {', '.join(MODELS)} or 'all' (default llama-8b)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of lora_triton, lora_triton_delta, torch_unfused, peft, "
                        "torch_compile, base (default: all that apply)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the unfused path (slow)")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats per provider (suite default)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="untimed warm-up rounds (suite default)")
    p.add_argument("--max-cases", type=_positive, default=None, help="run only the first N cases")
    p.add_argument("--only", default=None,
                   help="comma-separated case names or substrings of names (see --list); "
                        "one that matches nothing is an error")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--no-ceilings", action="store_true", help="skip the matmul/copy ceiling measurement")
    p.add_argument("--small-ceilings", action="store_true",
                   help="measure ceilings on a tiny matmul/copy (smoke tests only: not a real peak)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU: torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results document here")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG of time vs tokens here")
    p.add_argument("--from-json", default=None, help="do not run: print the table (and --plot) of a saved run")
    p.add_argument("--compact", action="store_true", help="shorter table")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return n


def _non_negative(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return n


def resolve_cases(args: argparse.Namespace):
    cases = suite_cases(args.suite, parse_models(args.shapes), cuda=args.device == "cuda")
    if args.dtype:
        cases = [replace(c, dtype=args.dtype) for c in cases]
    cases = select_cases(cases, args.only)
    return cases[: args.max_cases] if args.max_cases else cases


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from . import report  # matplotlib only loads when plotting

    if args.from_json:
        doc = report.load_json(args.from_json)
        print(report.format_table(doc, compact=args.compact))
        if args.plot_path:
            report.plot(doc, args.plot_path)
        return 0
    try:
        cases = resolve_cases(args)
    except ValueError as exc:
        print(f"lora-triton bench: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(c.name)
        return 0

    import torch

    from .runner import ALL_PROVIDERS, RunSettings, apply_ceilings, collect_metadata, run_cases

    if args.device == "cuda" and not torch.cuda.is_available():
        print("lora-triton bench: error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    providers = ALL_PROVIDERS
    if args.providers:
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        unknown = [p for p in providers if p not in ALL_PROVIDERS]
        if unknown:
            print(f"lora-triton bench: error: unknown providers {unknown}; choose from {ALL_PROVIDERS}",
                  file=sys.stderr)
            return 2
        if "torch_compile" in providers:
            args.compile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = RunSettings(device=device, repeats=args.repeats, warmup=args.warmup, providers=providers,
                           compile=args.compile, time_budget_s=args.time_budget, ceilings=not args.no_ceilings,
                           small_ceilings=args.small_ceilings,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    meta = collect_metadata(device, ["lora-triton", "bench", *argv])
    records, skipped = run_cases(cases, settings)  # measures the ceilings before every case
    for dt in sorted({c.dtype for c in cases}):  # and once more at the end; the best is kept
        settings.measure_ceilings(dt)
    ceilings = settings.best_ceilings()
    apply_ceilings(records, ceilings)
    meta["load_average_end"] = _load_average()  # before the document: its warnings read both ends
    doc = report.build_document(args.suite, meta, ceilings, cases, records, skipped)
    if args.json_path:
        report.write_json(doc, args.json_path)
    if args.plot_path:
        report.plot(doc, args.plot_path)
    print(report.format_table(doc, compact=args.compact))
    return 0 if records else 1


def _load_average():
    import os

    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    sys.exit(main())
