"""Serving overhead over the frozen base on CPU, ours vs PEFT, paired round by round (not a timed test).

    python bench/serve_cpu_overhead.py [--rounds 30] [--tokens 64 256] [--threads N] [--cpu-time] [--json out.json]

The harness's own serve operands and providers (``lora_triton``, ``peft``, ``base``: 16 adapters r=16,
x [T, 1, 4096], sequence i on adapter i % 16, fp32) called in a rotating order, one call of each per
round. A 1-3 ms overhead on a 15-60 ms base GEMM drowns in the spread of separate medians on a shared
machine, so two views are reported:

* paired: each round's call minus that round's base-provider call (median and p20..p80);
* outside the GEMM: each call of ours and of PEFT minus its own base GEMM on the base weight, timed
  inside the call (``F.linear``; ours, when every row has an adapter, ``addmm_`` onto the deltas), which
  leaves the base GEMM's own noise (other tenants in the L3) out; the base GEMM inside each call is
  reported next to the base provider's whole call, to show that both run the same GEMM.

On a loaded machine ``--threads 1 --cpu-time`` (CPU time of the one thread doing all the work, so time
spent descheduled does not count) is the steadier view; the harness and the goal use wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lora_triton.benchmark import serve_providers as sp
from lora_triton.benchmark.cases import serve_cases
from lora_triton.benchmark.shapes import MODELS
from lora_triton.benchmark.stats import percentile


def _stats(values) -> dict:
    """Median and p20..p80 as the harness's ``summarize`` takes them (``stats.percentile``, linear)."""
    return {"median": statistics.median(values), "p20": percentile(values, 20.0), "p80": percentile(values, 80.0)}


def measure(tokens: int, rounds: int, warmup: int = 3, clock=time.perf_counter) -> dict:
    cases = serve_cases(MODELS["llama-8b"], False)
    case = next((c for c in cases if c.tokens == tokens), None)
    if case is None:  # not a bare StopIteration
        raise SystemExit(f"--tokens {tokens}: the serve cases have {sorted({c.tokens for c in cases})} tokens")
    ops = sp.make_serve_operands(case, torch.device("cpu"), 1)
    fns = {"lora_triton": sp._build_ours(ops, case, ops.weight).fn, "peft": sp._build_peft(ops, case).fn,
           "base": sp._build_base(ops, case).fn}
    names = list(fns)
    weight_ptr = ops.weight.data_ptr()
    gemm = []  # durations of the base GEMM (on the base weight) within the current call
    real_linear, real_addmm_ = F.linear, torch.Tensor.addmm_

    def timed_linear(x, weight, bias=None):
        if weight.data_ptr() != weight_ptr:
            return real_linear(x, weight, bias)
        t0 = clock()
        out = real_linear(x, weight, bias)
        gemm.append(clock() - t0)
        return out

    def timed_addmm_(y, mat1, mat2, **kw):  # ours: the deltas first, then the base GEMM onto them (beta=1)
        if mat2.data_ptr() != weight_ptr:
            return real_addmm_(y, mat1, mat2, **kw)
        t0 = clock()
        out = real_addmm_(y, mat1, mat2, **kw)
        gemm.append(clock() - t0)
        return out

    for _ in range(warmup):
        for n in names:
            fns[n](0)
    total = {n: [] for n in names}
    inner = {n: [] for n in names}
    # Looked up at call time by nn.Linear (PEFT's base layer) and by our reference.
    F.linear, torch.Tensor.addmm_ = timed_linear, timed_addmm_
    try:
        for rep in range(rounds):
            shift = rep % len(names)
            for n in names[shift:] + names[:shift]:
                gemm.clear()
                t0 = clock()
                fns[n](0)
                total[n].append((clock() - t0) * 1e3)
                inner[n].append(sum(gemm) * 1e3)
    finally:
        F.linear, torch.Tensor.addmm_ = real_linear, real_addmm_
    out = {"tokens": tokens, "rounds": rounds, "median_ms": {n: statistics.median(v) for n, v in total.items()}}
    for n in ("lora_triton", "peft"):
        out[f"paired_{n}_ms"] = _stats([a - b for a, b in zip(total[n], total["base"])])
        out[f"outside_gemm_{n}_ms"] = _stats([a - g for a, g in zip(total[n], inner[n])])
        out[f"gemm_inside_{n}_ms"] = statistics.median(inner[n])
    for view in ("paired", "outside_gemm"):
        out[f"ratio_{view}"] = out[f"{view}_lora_triton_ms"]["median"] / out[f"{view}_peft_ms"]["median"]
    return out


def _fmt(s: dict) -> str:
    return f"{s['median']:+.2f} ({s['p20']:+.2f}..{s['p80']:+.2f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time.thread_time instead of wall time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads(),
              "clock": "thread_time" if args.cpu_time else "perf_counter",
              "torch": torch.__version__, "load_average": os.getloadavg(), "results": []}
    for t in args.tokens:
        r = measure(t, args.rounds, clock=time.thread_time if args.cpu_time else time.perf_counter)
        report["results"].append(r)
        med = r["median_ms"]
        print(f"T={t}: median ours {med['lora_triton']:.2f} ms, peft {med['peft']:.2f}, base {med['base']:.2f} "
              f"(base GEMM inside ours {r['gemm_inside_lora_triton_ms']:.2f}, inside peft "
              f"{r['gemm_inside_peft_ms']:.2f})\n"
              f"  paired overhead: ours {_fmt(r['paired_lora_triton_ms'])}, peft {_fmt(r['paired_peft_ms'])}, "
              f"ours/peft {r['ratio_paired']:.2f}\n"
              f"  outside the GEMM: ours {_fmt(r['outside_gemm_lora_triton_ms'])}, "
              f"peft {_fmt(r['outside_gemm_peft_ms'])}, ours/peft {r['ratio_outside_gemm']:.2f}", flush=True)
    report["load_average_end"] = os.getloadavg()
    print(f"load {report['load_average']} -> {report['load_average_end']}, {report['date']}, "
          f"{report['threads']} threads, {report['clock']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
