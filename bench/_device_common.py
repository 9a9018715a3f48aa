"""What the ``bench/device_check_*.py`` scripts of this checkout share: the command line, the CUDA (or
interpreter self-test) setup, the 2x error rule, a step deadline, timing, and the JSON they write.

Every script takes ``[--quick] [--out DIR] [--budget S] [--autotune] [--self-test]``: ``--budget`` is the
seconds the script may use (``device_check.sh`` passes its step timeout minus a margin); cases not started
by then are reported as skipped, so the JSON is written before the shell's ``timeout`` would kill the
step. ``--self-test`` runs tiny fp32/fp16 shapes on CPU through Triton's interpreter (no GPU; the
numbers mean nothing, the code path is the one the GPU runs). Nothing here imports torch at import
time, so ``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"gpu-{day}"),
                    help="output directory (default: bench/results/gpu-DATE)")
    ap.add_argument("--quick", action="store_true", help="the reduced case list device_check.sh runs")
    ap.add_argument("--budget", type=float, default=None, help="seconds; cases not started by then are skipped")
    ap.add_argument("--autotune", action="store_true", help="autotune every kernel (slow on a cold GPU)")
    ap.add_argument("--self-test", action="store_true",
                    help="tiny shapes on CPU through TRITON_INTERPRET=1 (checks the script, not the GPU)")
    return ap


def setup(args, name: str):
    """Environment, then torch: returns (torch, device) or exits 2 without CUDA (unless --self-test)."""
    os.environ["LORA_TRITON_AUTOTUNE"] = "1" if args.autotune else os.environ.get("LORA_TRITON_AUTOTUNE", "0")
    os.environ["LORA_TRITON_BACKEND"] = "triton"
    if args.self_test:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if args.self_test:
        return torch, torch.device("cpu")
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device (use --self-test for a CPU check of the script)", file=sys.stderr)
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, torch.device("cuda")


class Deadline:
    """Seconds left of a step's budget (None: no limit)."""

    def __init__(self, budget: float | None):
        self.start = time.monotonic()
        self.budget = budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def passed(self, reserve: float = 0.0) -> bool:
        return self.budget is not None and self.elapsed() + reserve >= self.budget


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(case: str, output: str, got, same_precision, truth, atol: float) -> dict:
    """The team's 2x rule: max|kernel - truth| <= 2 max|same-precision reference - truth| + atol (1 + max|truth|)."""
    import torch

    e_k, e_r = max_err(got, truth), max_err(same_precision, truth)
    bound = 2 * e_r + atol * (1.0 + (truth.abs().max().item() if truth.numel() else 0.0))
    ok = bool(torch.isfinite(got).all().item()) and e_k <= bound
    return dict(case=case, output=output, kernel_err=e_k, reference_err=e_r, bound=bound, ok=ok)


def poison_empty(*modules) -> None:
    """NaN-fill the outputs the launchers allocate (their ``_empty``), so an element a kernel never
    writes fails the check instead of passing on leftover memory."""
    import torch

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    for m in modules:
        m._empty = empty


def run_cases(cases, fn, deadline: Deadline, label=lambda c: str(c[0])) -> list[dict]:
    """fn(case) -> rows for each case in turn; an exception is a failed row (one broken shape must not
    hide the rest); cases not started before the deadline are skipped rows (ok=None)."""
    rows = []
    for case in cases:
        if deadline.passed():
            rows.append(dict(case=label(case), output="(skipped: step budget spent)", ok=None))
            continue
        t0 = time.monotonic()
        try:
            rows += fn(case)
        except Exception as e:
            rows.append(dict(case=label(case), output="(exception)", ok=False, error=repr(e)[:500]))
        print(f"  {label(case)}: {time.monotonic() - t0:.1f}s", flush=True)
    return rows


def bench_ms(fn, device, warmup: int = 5, rep: int = 40) -> float:
    """Median milliseconds (triton.testing.do_bench: CUDA events, L2 flushed between runs). On CPU
    (--self-test) one timed call: it keeps the path working, the number means nothing."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def metadata(torch, device, args) -> dict:
    import triton

    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=device.type,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                torch=torch.__version__, triton=triton.__version__, autotune=os.environ["LORA_TRITON_AUTOTUNE"],
                quick=bool(args.quick), self_test=bool(args.self_test), budget_s=args.budget,
                load_average=list(os.getloadavg()), argv=sys.argv[1:])


def write_json(outdir: str, name: str, doc: dict) -> Path:
    """Atomic (temporary + rename): a step killed while writing leaves the previous file or none."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)
    return path


def verdict(rows: list[dict], deadline: Deadline, what: str = "checks") -> int:
    """Prints the PASS/FAIL line; 0 when every check that ran passed and at least one ran. Skipped
    checks (budget) are counted and named, not failures: device_check.sh reports them."""
    ran = [r for r in rows if r.get("ok") is not None]
    skipped = len(rows) - len(ran)
    ok = bool(ran) and all(r["ok"] for r in ran)
    extra = f", {skipped} skipped (budget)" if skipped else ""
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(bool(r['ok']) for r in ran)}/{len(ran)} {what}{extra}, "
          f"{deadline.elapsed():.1f}s", flush=True)
    return 0 if ok else 1


def environment() -> int:
    """device_check.sh's first step: versions, the GPU, the optional packages; 2 without a CUDA device."""
    import importlib.util

    import torch

    print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available())
    for name in ("triton", "peft", "bitsandbytes", "matplotlib"):
        print(name, "ok" if importlib.util.find_spec(name) else "MISSING (its provider/output is skipped)")
    print("LORA_TRITON_AUTOTUNE", os.environ.get("LORA_TRITON_AUTOTUNE", "1"), "LORA_TRITON_CACHE_DIR",
          os.environ.get("LORA_TRITON_CACHE_DIR", "(default)"), "load", os.getloadavg())
    if not torch.cuda.is_available():
        print("no CUDA device: every GPU step will fail", file=sys.stderr)
        return 2
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["env"]:
        print("usage: python bench/_device_common.py env   (the environment step of device_check.sh)", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(environment())
