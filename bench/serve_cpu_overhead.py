"""Serving overhead over the frozen base on CPU, ours vs PEFT, paired round by round (not a timed test).

    python bench/serve_cpu_overhead.py [--rounds 30] [--tokens 64 256] [--json out.json]

The harness's own serve operands and providers (``lora_triton``, ``peft``, ``base``: 16 adapters r=16,
x [T, 1, 4096], sequence i on adapter i % 16, fp32) called in a rotating order, one call of each per
round. A 1-3 ms overhead on a 15-60 ms base GEMM drowns in the spread of separate medians on a shared
machine, so each round's overhead is taken against that round's base call (paired differences) and
the report gives their median and p20..p80, with the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lora_triton.benchmark.cases import serve_cases
from lora_triton.benchmark.serve_providers import build_serve_providers
from lora_triton.benchmark.shapes import MODELS

PROVIDERS = ("lora_triton", "peft", "base")


def _q(values, f):
    v = sorted(values)
    return v[round(f * (len(v) - 1))]


def measure(tokens: int, rounds: int, warmup: int = 3) -> dict:
    case = next(c for c in serve_cases(MODELS["llama-8b"], False) if c.tokens == tokens)
    providers, skipped = build_serve_providers(case, torch.device("cpu"), list(PROVIDERS), 1)
    if skipped:
        raise SystemExit(f"providers skipped: {skipped}")
    fns = {p.name: p.fn for p in providers}
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n](0)
    times = {n: [] for n in names}
    for rep in range(rounds):
        shift = rep % len(names)
        for n in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[n](0)
            times[n].append(time.perf_counter() - t0)
    ms = {n: [v * 1e3 for v in times[n]] for n in names}
    out = {"tokens": tokens, "rounds": rounds,
           "median_ms": {n: statistics.median(v) for n, v in ms.items()}}
    for n in ("lora_triton", "peft"):
        paired = [a - b for a, b in zip(ms[n], ms["base"])]
        out[f"overhead_{n}_ms"] = {"median": statistics.median(paired), "p20": _q(paired, 0.2),
                                   "p80": _q(paired, 0.8)}
    out["ratio_of_overheads"] = out["overhead_lora_triton_ms"]["median"] / out["overhead_peft_ms"]["median"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "load_average": os.getloadavg(), "results": []}
    for t in args.tokens:
        r = measure(t, args.rounds)
        report["results"].append(r)
        med = r["median_ms"]
        ours, peft = r["overhead_lora_triton_ms"], r["overhead_peft_ms"]
        print(f"T={t}: median ours {med['lora_triton']:.2f} ms, peft {med['peft']:.2f}, base {med['base']:.2f}; "
              f"paired overhead ours {ours['median']:+.2f} ({ours['p20']:+.2f}..{ours['p80']:+.2f}), "
              f"peft {peft['median']:+.2f} ({peft['p20']:+.2f}..{peft['p80']:+.2f}); "
              f"ours/peft {r['ratio_of_overheads']:.2f}", flush=True)
    report["load_average_end"] = os.getloadavg()
    print(f"load {report['load_average']} -> {report['load_average_end']}, {report['date']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
