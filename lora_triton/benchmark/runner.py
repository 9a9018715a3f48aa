"""Runs cases: builds providers, warms them up, probes memory, times them interleaved, and turns
samples into records (statistics, ratios, TFLOP/s, GB/s, fraction of roofline)."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .cases import Case
from .dora_cases import DORA_PROVIDERS, build_dora_providers, dora_case_costs
from .dora_cases import OP as DORA_OP
from .providers import SINGLE_PROVIDERS, Provider, build_single_providers
from .roofline import (
    Ceilings,
    OpCost,
    base_linear_cost,
    dtype_bytes,
    lora_linear_cost,
    measure_ceilings,
    multi_lora_cost,
    roofline_seconds,
    unfused_extra_bytes,
)
from .serve_providers import SERVE_PROVIDERS, build_serve_providers
from .stats import summarize
from .timing import capture_graphs, cuda_peak_bytes, measure_interleaved, saved_tensor_bytes

ALL_PROVIDERS = tuple(dict.fromkeys(SINGLE_PROVIDERS + SERVE_PROVIDERS + DORA_PROVIDERS))
# (warmup rounds, repeats) when neither the case nor the CLI sets them. The first call and the memory
# probe already run every provider untimed, so CPU needs no further warm-up.
DEFAULTS = {"cpu": (0, 5), "cuda": (5, 30)}


@dataclass
class RunSettings:
    device: torch.device
    repeats: int | None = None
    warmup: int | None = None
    providers: tuple[str, ...] = ALL_PROVIDERS
    compile: bool = False
    time_budget_s: float | None = None
    ceilings: bool = True
    small_ceilings: bool = False  # tiny matmul/copy for smoke tests: fast, not a real peak
    log: Callable[[str], None] = print
    measured: dict = field(default_factory=dict)  # dtype -> [Ceilings, ...]: start, before each case, end

    def measure_ceilings(self, dtype: str) -> None:
        if self.ceilings:
            sizes = {"matmul_n": 256, "copy_bytes": 8 << 20} if self.small_ceilings else {}
            repeats = 5 if self.device.type == "cuda" else 10
            self.measured.setdefault(dtype, []).append(
                measure_ceilings(self.device, getattr(torch, dtype), repeats=repeats, **sizes))

    def best_ceilings(self) -> dict[str, Ceilings]:
        """Per dtype, the best FLOP/s and bandwidth seen: other load on the machine only lowers them."""
        return {dt: Ceilings(max(c.flops_per_s for c in cs), max(c.bytes_per_s for c in cs), cs[0].matmul_n,
                             cs[0].copy_bytes) for dt, cs in self.measured.items()}


def _n_sets(case: Case, device: torch.device) -> int:
    """Input sets to rotate: on CUDA enough x copies to exceed L2 (~50 MB), at most 4."""
    if device.type != "cuda":
        return 1
    x_bytes = case.tokens * case.in_features * dtype_bytes(getattr(torch, case.dtype))
    return max(1, min(4, -(-(64 << 20) // max(1, x_bytes))))


def case_costs(case: Case) -> dict[str, OpCost]:
    """Analytic cost per cost kind: 'lora' (the op), 'base' (the floor), 'delta' (LoRA term only)."""
    e = dtype_bytes(getattr(torch, case.dtype))
    m, k, n = case.tokens, case.in_features, case.out_features
    if case.op == DORA_OP:
        return dora_case_costs(case, e)
    if case.op == "lora_linear":
        return {"lora": lora_linear_cost(m, k, n, case.rank, e, case.mode),
                "base": base_linear_cost(m, k, n, e, case.mode)}
    ar = case.adapter_ranks
    used = sorted({i % case.adapters for i in range(case.batch)})
    token_ranks = [ar[i % case.adapters] for i in range(case.batch) for _ in range(case.seq_len)]
    adapter_ranks = [ar[a] for a in used]
    return {"lora": multi_lora_cost(m, k, n, token_ranks, adapter_ranks, e, include_base=True),
            "delta": multi_lora_cost(m, k, n, token_ranks, adapter_ranks, e, include_base=False),
            "base": base_linear_cost(m, k, n, e, "fwd")}


def _wanted(case: Case, settings: RunSettings) -> list[str]:
    pool = {"lora_linear": SINGLE_PROVIDERS, DORA_OP: DORA_PROVIDERS}.get(case.op, SERVE_PROVIDERS)
    names = [p for p in pool if p in settings.providers]
    if not settings.compile:
        names = [p for p in names if p != "torch_compile"]
    return names


def _first_set(*values):
    return next(v for v in values if v is not None)


def _memory(p: Provider, case: Case, device: torch.device) -> dict | None:
    if device.type == "cuda":
        return {"kind": "cuda_peak_allocated", "bytes": cuda_peak_bytes(p.fn, 0, device)}
    if case.mode == "fwd+bwd":
        return {"kind": "saved_for_backward", "bytes": saved_tensor_bytes(p.fn, 0, p.exclude)}
    return None


def run_case(case: Case, settings: RunSettings) -> tuple[list[dict], list[dict]]:
    """(records, skipped) for one case."""
    device = settings.device
    n_sets = _n_sets(case, device)
    build = {"lora_linear": build_single_providers, DORA_OP: build_dora_providers}.get(case.op, build_serve_providers)
    providers, skipped_pairs = build(case, device, _wanted(case, settings), n_sets)
    skipped = [{"case": case.name, "provider": n, "reason": r} for n, r in skipped_pairs]
    warmup = _first_set(settings.warmup, case.warmup, DEFAULTS[device.type][0])
    repeats = _first_set(settings.repeats, case.repeats, DEFAULTS[device.type][1])
    fns, graphed, memory, alive = {}, {}, {}, []
    for p in providers:
        try:
            p.fn(0)  # first call outside timing: compile, autotune, lazy init; errors skip the provider
            memory[p.name] = _memory(p, case, device)
            fn, graphed[p.name] = p.fn, False
            if case.cuda_graph and device.type == "cuda" and p.graphable:
                try:
                    fn, graphed[p.name] = capture_graphs(p.fn, n_sets, device), True
                except Exception as exc:  # eager fallback: a host sync inside the op, say
                    p.note = (p.note + f"; cuda graph capture failed: {type(exc).__name__}").lstrip("; ")
            fns[p.name] = fn
            alive.append(p)
        except Exception as exc:
            skipped.append({"case": case.name, "provider": p.name, "reason": f"{type(exc).__name__}: {exc}"[:300]})
            settings.log(f"  skip {p.name}: {type(exc).__name__}: {exc}")
    if not fns:
        return [], skipped
    samples = measure_interleaved(fns, device, repeats=repeats, warmup=warmup, n_sets=n_sets)
    return _records(case, alive, samples, graphed, memory, settings), skipped


def _records(case, providers, samples, graphed, memory, settings) -> list[dict]:
    costs = case_costs(case)
    stats = {p.name: summarize(samples[p.name]) for p in providers}
    base_t = stats["base"].median_s if "base" in stats else None
    unfused_t = stats["torch_unfused"].median_s if "torch_unfused" in stats else None
    out = []
    for p in providers:
        s, cost = stats[p.name], costs[p.cost_kind]
        rec = {
            "case": case.name, "series": case.series, "suite": case.suite, "op": case.op, "provider": p.name,
            "mode": case.mode, "shape": case.shape_dict(), "label": case.label, "dtype": case.dtype,
            "dropout_p": case.dropout_p, "device": settings.device.type, "tags": list(case.tags),
            "stats": s.to_dict(), "cuda_graph": graphed[p.name], "note": p.note,
            "ratio_to_base": s.median_s / base_t if base_t else None,
            "ratio_to_unfused": s.median_s / unfused_t if unfused_t else None,
            "model": {"kind": p.cost_kind, "flops": cost.flops, "bytes": cost.bytes},
            "tflops": cost.flops / s.median_s / 1e12, "gbps": cost.bytes / s.median_s / 1e9,
            "roofline_fraction": None,  # filled by apply_ceilings once the run's ceilings are known
            "memory": memory.get(p.name),
        }
        if case.op == "lora_linear" and p.name in ("torch_unfused", "peft", "torch_compile"):
            e = dtype_bytes(getattr(torch, case.dtype))
            rec["model"]["unfused_extra_bytes"] = unfused_extra_bytes(
                case.tokens, case.in_features, case.out_features, case.rank, e, case.mode, case.dropout_p)
        out.append(rec)
    return out


def apply_ceilings(records: list[dict], ceilings: dict[str, Ceilings]) -> None:
    """Fraction of roofline = max(flops / peak FLOP/s, bytes / peak bandwidth) / measured median."""
    for rec in records:
        c = ceilings.get(rec["dtype"])
        if c is not None:
            cost = OpCost(rec["model"]["flops"], rec["model"]["bytes"])
            rec["roofline_fraction"] = roofline_seconds(cost, c) / rec["stats"]["median_s"]


def run_cases(cases: list[Case], settings: RunSettings) -> tuple[list[dict], list[dict]]:
    """Runs cases in order; once ``time_budget_s`` is spent, the rest are recorded as skipped."""
    start = time.perf_counter()
    records, skipped = [], []
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if settings.time_budget_s is not None and elapsed > settings.time_budget_s:
            skipped += [{"case": c.name, "provider": "*", "reason": f"time budget {settings.time_budget_s:g}s spent"}
                        for c in cases[i:]]
            settings.log(f"time budget spent after {i} of {len(cases)} cases; skipping the rest")
            break
        settings.log(f"[{i + 1}/{len(cases)}] {case.name}")
        settings.measure_ceilings(case.dtype)  # again before every case: on a shared machine the best counts
        recs, skips = run_case(case, settings)
        records += recs
        skipped += skips
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return records, skipped


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_metadata(device: torch.device, argv: list[str] | None = None) -> dict:
    """Everything needed to reproduce or judge a run: versions, git revision, date, hardware."""
    dev = {"type": device.type, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory)
    else:
        dev["name"] = dev["cpu"]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": _git_revision(),
        "command": " ".join(argv) if argv is not None else " ".join(sys.argv),
        "device": dev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _pkg_version("triton") if importlib.util.find_spec("triton") else None,
                     "peft": _pkg_version("peft"), "lora_triton": _pkg_version("lora_triton"),
                     "cuda": torch.version.cuda},
        "backend_env": os.environ.get("LORA_TRITON_BACKEND", "auto"),
        # Other processes share the machine: the 1/5/15-minute load average says how much.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
