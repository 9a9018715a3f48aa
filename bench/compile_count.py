"""How many Triton kernels the GPU kernel check (device_check_kernels.py) compiles on a cold sm_90 GPU, counted
on a CPU host without running any of them: the budget of device_check.sh's kernels step rests on this count.

    python bench/compile_count.py [--quick] [--json PATH]

Runs the launchers of every case (fused forward + backward, composed, grouped) on CPU tensors of the real
shapes, as on an H200 (TMA path, 132 SMs, 227 KB of shared memory, compute capability 9, default configs as
with LORA_TRITON_AUTOTUNE=0), with each kernel launch replaced by a recorder of its specialization: the
kernel, its constexprs and launch options, and Triton's own specialization of every argument (dtype,
16-divisibility of ints and pointers, the value 1, descriptor block shapes). Distinct keys = compiles.
cuBLAS calls of the composed path return empty tensors; nothing is computed. The shapes of the paths step
come next: "new compiles" there is what that step would compile after the kernels step (0 expected); then
the DoRA kernels of bench/device_check_dora.py's cases (its --quick list with --quick), the multi-adapter
kernels of device_check_serving.py and the NF4 GEMM/GEMV launches of device_check_nf4.py, each counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parent))

H200_SMS = 132
H200_SMEM = 232448  # sm_90 opt-in shared memory per block


def _recorder(seen: list):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    def spec(a):
        return a if isinstance(a, (bool, int, float, str, type(None))) and not hasattr(a, "data_ptr") else \
            native_specialize_impl(BaseBackend, a, False, True, True)

    def run(self, *args, grid, warmup, **kwargs):
        key = (self.fn.__name__, tuple(repr(native_specialize_impl(BaseBackend, a, False, True, True)) for a in args),
               tuple(sorted((k, repr(spec(v))) for k, v in kwargs.items())))
        seen.append(key)

    return run


class _NoGemm:
    """``torch`` for composed.py with its cuBLAS GEMMs replaced by empty results (counting only)."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def mm(self, a, b):
        return self._torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)

    def addmm(self, bias, a, b):
        return self.mm(a, b)


def count(quick: bool) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["LORA_TRITON_AUTOTUNE"] = "0"
    import device_check_kernels as dck
    import torch
    import triton.runtime.jit as jit

    from lora_triton.kernels import autotune as at
    from lora_triton.kernels import composed, grouped
    from lora_triton.kernels import gemm_launch as gl
    from lora_triton.kernels import lora_linear as fused

    seen: list = []
    with ExitStack() as stack:  # every patch undone on the way out
        for obj, name, value in ((jit.JITFunction, "run", _recorder(seen)), (gl, "tma_device", lambda d: True),
                                 (gl, "_programs", lambda d: H200_SMS),
                                 (fused, "_target_programs", lambda d: 2 * H200_SMS),
                                 (at, "_smem_limit", lambda: H200_SMEM), (composed, "torch", _NoGemm(torch))):
            stack.enter_context(patch.object(obj, name, value))
        return _count(quick, seen, torch, dck, composed, grouped, fused)


def _dora_cases(seen, distinct, torch, quick) -> list[dict]:
    """The DoRA kernels of device_check_dora.py's cases (its step compiles these; DoRA kernels have fixed configs)."""
    import device_check_dora as dcd

    from lora_triton.kernels import dora

    quick_names = getattr(dcd, "QUICK", None)
    rows = []
    for label, m, k, n, r, p, transposed, has_bias, dtype_name in dcd.CASES:
        if quick and quick_names is not None and label not in quick_names:
            continue
        dt = getattr(torch, dtype_name)
        w = torch.empty(k, n, dtype=dt).t() if transposed else torch.empty(n, k, dtype=dt)
        c = dict(x=torch.empty(m, k, dtype=dt), w=w, bias=torch.empty(n, dtype=dt) if has_bias else None,
                 a=torch.empty(r, k, dtype=dt), b=torch.empty(n, r, dtype=dt), dy=torch.empty(m, n, dtype=dt))
        seed = torch.tensor([1], dtype=torch.int64) if p else None
        start = len(seen)
        dcd._run(dora, c, torch.ones(n), 2.0, p, seed)
        new = set(seen[start:]) - distinct
        distinct |= new
        rows.append(dict(case=f"dora {label}", launches=len(seen) - start, new_compiles=len(new),
                         kernels=sorted({key[0] for key in seen[start:]})))
    return rows


def _serving_cases(seen, torch, quick) -> dict:
    """The multi-adapter kernels device_check_serving.py launches (cases, the decode step, 256 distinct adapters)."""
    import device_check_serving as dcs

    from lora_triton.kernels import multi_lora

    g = torch.Generator().manual_seed(0)
    start = len(seen)
    for t, k_in, n, num, r_max, slots, ranks, mode, q in dcs.CASES:
        if q or not quick:
            x, w, b, a, bb, s, ids, rk, wts = dcs._setup(torch, torch.device("cpu"), torch.bfloat16, g, t, k_in, n,
                                                         num, r_max, slots, ranks)
            multi_lora.multi_lora_linear(x, w, b, a, bb, s, ids, rk, wts, mode=mode)
    for shape in (dcs.DECODE, dcs.DISTINCT):
        x, w, b, a, bb, s, ids, rk, _ = dcs._setup(torch, torch.device("cpu"), torch.bfloat16, g, *shape)
        multi_lora.multi_lora_linear(x, w, b, a, bb, s, ids, rk)
    return dict(launches=len(seen) - start, compiles=len(set(seen[start:])))


def _nf4_cases(seen, torch, quick) -> dict:
    """The NF4 launches device_check_nf4.py makes per M: fwd and dgrad with and without the LoRA term, and at
    decode sizes the tiled GEMM too (GEMV_MAX_M = 0), as that script times it."""
    import device_check_nf4 as dcn

    from lora_triton.kernels import nf4 as kern
    from lora_triton.nn.nf4_linear import NF4Linear

    cfg = dcn.QUICK if quick else dcn.FULL
    k, n, r, dt = cfg["k"], cfg["n"], cfg["r"], getattr(torch, cfg["dtype"])
    w = NF4Linear.from_weight(torch.zeros(n, k)).nf4_weight()
    start = len(seen)
    for m in cfg["ms"]:
        x, dy, u = torch.empty(m, k, dtype=dt), torch.empty(m, n, dtype=dt), torch.empty(m, r, dtype=dt)
        lb, la = torch.empty(n, r, dtype=dt), torch.empty(r, k, dtype=dt)
        saved = kern.GEMV_MAX_M
        for gemv_max in ((saved, 0) if m <= saved else (saved,)):
            kern.GEMV_MAX_M = gemv_max
            try:
                kern.nf4_linear_fwd(x, w, None, u, lb, 0.5)
                kern.nf4_linear_fwd(x, w, None, None, None, 0.0)
                kern.nf4_linear_dgrad(dy, w, u, la)
                kern.nf4_linear_dgrad(dy, w, None, None)
            finally:
                kern.GEMV_MAX_M = saved
    return dict(launches=len(seen) - start, compiles=len(set(seen[start:])))


def _count(quick, seen, torch, dck, composed, grouped, fused) -> dict:
    import device_check_paths

    # The paths step times these shapes after the kernel step: their compiles should all be cached.
    timed = [(f"paths M={m} N={n} r={r} p={p}", m, k, n, r, p, "plain", False, "bfloat16", ("fused", "composed"), True)
             for m, k, n, r, p in device_check_paths.SHAPES]
    per_case, distinct = [], set()
    for case in [c for c in dck.SINGLE if c[-1] or not quick] + timed:
        label, m, k, n, r, p, w_mode, has_bias, dtype_name, paths, _ = case
        dt = getattr(torch, dtype_name)
        x, dy = torch.empty(m, k, dtype=dt), torch.empty(m, n, dtype=dt)
        w = None if w_mode == "none" else (torch.empty(n, k, dtype=dt) if w_mode == "plain"
                                           else torch.empty(k, n, dtype=dt).t())
        b = torch.empty(n, dtype=dt) if has_bias else None
        a, bb = torch.empty(r, k, dtype=dt), torch.empty(n, r, dtype=dt)
        seed = torch.tensor([1], dtype=torch.int64) if p > 0 else None
        start = len(seen)
        for path in paths:
            fwd, bwd = ((fused.fused_fwd, fused.fused_bwd) if path == "fused"
                        else (composed.lora_linear_fwd, composed.lora_linear_bwd))
            _, u = fwd(x, w, b, a, bb, 2.0, p, seed)
            bwd(dy, x, w, a, bb, u, 2.0, p, seed, True)
        new = set(seen[start:]) - distinct
        distinct |= new
        per_case.append(dict(case=label, launches=len(seen) - start, new_compiles=len(new),
                             kernels=sorted({key[0] for key in seen[start:]})))
    for case in [c for c in dck.GROUPED if c[-1] or not quick]:
        label, m, k, ns, rs, ps, dtype_name, _ = case
        dt = getattr(torch, dtype_name)
        x = torch.empty(m, k, dtype=dt)
        ws, a_s = [torch.empty(n, k, dtype=dt) for n in ns], [torch.empty(r, k, dtype=dt) for r in rs]
        b_s, dys = [torch.empty(n, r, dtype=dt) for n, r in zip(ns, rs)], [torch.empty(m, n, dtype=dt) for n in ns]
        seeds = torch.arange(len(ns), dtype=torch.int64)
        start = len(seen)
        _, u = grouped.lora_linear_grouped_fwd(x, ws, [None] * len(ns), a_s, b_s, [2.0] * len(ns), ps, seeds)
        grouped.lora_linear_grouped_bwd(dys, x, ws, a_s, b_s, u, [2.0] * len(ns), ps, seeds, True)
        new = set(seen[start:]) - distinct
        distinct |= new
        per_case.append(dict(case=label, launches=len(seen) - start, new_compiles=len(new),
                             kernels=sorted({key[0] for key in seen[start:]})))
    kernels = sorted({key[0] for key in distinct})
    lora = dict(quick=quick, cases=per_case, launches=len(seen), compiles=len(distinct),
                per_kernel={name: sum(key[0] == name for key in distinct) for name in kernels})
    dora_rows = _dora_cases(seen, set(), torch, quick)
    lora["dora"] = dict(cases=dora_rows, compiles=sum(r["new_compiles"] for r in dora_rows))
    lora["serving"] = _serving_cases(seen, torch, quick)
    lora["nf4"] = _nf4_cases(seen, torch, quick)
    return lora


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the case list device_check.sh runs")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    doc = count(args.quick)
    for row in doc["cases"]:
        print(f"{row['case']:<32} launches {row['launches']:>3}  new compiles {row['new_compiles']:>3}  "
              f"{' '.join(k.removeprefix('_').removesuffix('_kernel') for k in row['kernels'])}")
    print(f"kernels + paths steps: {doc['launches']} launches, {doc['compiles']} distinct kernel compiles; "
          f"per kernel: {doc['per_kernel']}")
    for row in doc["dora"]["cases"]:
        print(f"{row['case']:<32} launches {row['launches']:>3}  new compiles {row['new_compiles']:>3}  "
              f"{' '.join(k.removeprefix('_').removesuffix('_kernel') for k in row['kernels'])}")
    print(f"dora step (device_check_dora.py cases): {doc['dora']['compiles']} distinct compiles")
    for step in ("serving", "nf4"):
        print(f"{step} step: {doc[step]['launches']} launches, {doc[step]['compiles']} distinct compiles")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
