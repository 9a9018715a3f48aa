"""GPU check, LoRA training kernels: bf16 (and fp16) correctness of the fused path (persistent TMA GEMMs on
sm_90+, pointer GEMMs for r > 64 and weight-less operands), the composed cuBLAS path and the
grouped (q/k/v) op against the fp32 reference. Prints a table, writes OUT/kernels.json; exit 1 on failure.

    python bench/device_check_kernels.py [--quick] [--out DIR] [--budget S] [--jobs N] [--self-test]

The cases run in N worker processes (default 4): on a cold GPU most of this step is Triton compiling 52
kernel specializations (--quick; counted by bench/compile_count.py), CPU work the workers do side by side;
the compiled kernels land in Triton's cache, where the timing step after it (device_check_paths.py: the
same M=8192 shapes, r 16/64, p 0/0.1) finds all of its kernels. Default configs (LORA_TRITON_AUTOTUNE=0)
unless --autotune.
Criterion per output (y, U, dx, dA, dB): max|kernel - fp32| <= 2 max|reference - fp32| + atol (1 + max|fp32|),
"reference" being the PyTorch twin in the same low precision on the same inputs and seed (so the same
dropout mask); outputs are NaN-filled before the kernels write them.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device_common as common  # noqa: E402

ATOL = 1e-3
# (label, M, K, N, r, p, weight layout, bias, dtype, paths, in --quick)
SINGLE = [
    ("q_proj r16 p0.1", 8192, 4096, 4096, 16, 0.1, "plain", False, "bfloat16", ("fused", "composed"), True),
    ("up_proj r16 p0", 8192, 4096, 14336, 16, 0.0, "plain", False, "bfloat16", ("fused", "composed"), True),
    ("up_proj r64 p0.1", 8192, 4096, 14336, 64, 0.1, "plain", False, "bfloat16", ("fused", "composed"), True),
    ("q_proj r64 p0", 8192, 4096, 4096, 64, 0.0, "plain", False, "bfloat16", ("fused", "composed"), True),
    ("down_proj r256 p0 (pointer)", 1024, 14336, 4096, 256, 0.0, "plain", False, "bfloat16", ("fused",), True),
    ("down_proj r256 p0.05 (pointer)", 1024, 14336, 4096, 256, 0.05, "plain", False, "bfloat16", ("fused",), True),
    ("decode M=1 odd K,N r1", 1, 1000, 3000, 1, 0.0, "plain", True, "bfloat16", ("fused", "composed"), True),
    ("gpt2 Conv1D odd (W^T, TMA)", 37, 768, 2304, 3, 0.1, "transposed", True, "bfloat16", ("fused", "composed"), True),
    ("LoRA-only (no W, pointer)", 512, 2048, 1536, 32, 0.1, "none", False, "bfloat16", ("fused", "composed"), True),
    ("fp16 q_proj bias", 4096, 4096, 4096, 16, 0.1, "plain", True, "float16", ("fused", "composed"), True),
    ("odd K,N M=1000 r1 p0.2", 1000, 1000, 3000, 1, 0.2, "plain", True, "bfloat16", ("fused", "composed"), False),
    ("bf16 M=3000 r8 p0", 3000, 2048, 5120, 8, 0.0, "plain", True, "bfloat16", ("fused",), False),
]
# (label, M, K, [N_g], [r_g], [p_g], dtype, in --quick)
GROUPED = [
    ("grouped q,k,v p0.1", 2048, 4096, (4096, 1024, 1024), (16, 16, 8), (0.1, 0.1, 0.1), "bfloat16", True),
    ("grouped p0 mixed r", 2048, 4096, (4096, 1024), (16, 64), (0.0, 0.0), "bfloat16", False),
]
SELF_TEST_SINGLE = [
    ("tiny fp16 p0.3", 19, 40, 33, 3, 0.3, "plain", True, "float16", ("fused", "composed"), True),
    ("tiny fp32 M=1 transposed", 1, 24, 20, 1, 0.0, "transposed", True, "float32", ("fused", "composed"), True),
    ("tiny weight None", 17, 32, 24, 2, 0.1, "none", False, "float16", ("fused",), True),
]
SELF_TEST_GROUPED = [("tiny grouped", 13, 32, (24, 16), (2, 3), (0.2, 0.0), "float32", True)]


_GEMMS: list[str] = []  # which main-GEMM kernels ("tma" / "pointer") the launchers chose, per case and path


def _spy(fn):
    def launch(*args, **kwargs):
        kind = fn(*args, **kwargs)
        _GEMMS.append(kind)
        return kind

    launch.spied = True
    return launch


def _modules():
    from lora_triton.kernels import composed, grouped
    from lora_triton.kernels import gemm_launch as gl
    from lora_triton.kernels import lora_linear as fused
    from lora_triton.reference import grouped as ref_grouped
    from lora_triton.reference import lora_linear as ref

    common.poison_empty(fused, composed, grouped)
    for name in ("fwd_gemm", "dgrad"):
        if not getattr(getattr(gl, name), "spied", False):
            setattr(gl, name, _spy(getattr(gl, name)))
    return fused, composed, grouped, ref, ref_grouped


def _gemm_kinds() -> str:
    kinds = "+".join(sorted(set(_GEMMS))) or "cuBLAS"
    _GEMMS.clear()
    return kinds


def _rand(torch, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return lambda *s: torch.randn(*s, device=dev, generator=g)


def single_case(case, dev):
    import torch

    label, m, k, n, r, p, w_mode, has_bias, dtype_name, paths, _ = case
    fused, composed, _, ref, _ = _modules()
    dt = getattr(torch, dtype_name)
    rnd = _rand(torch, dev, m * 7 + k)
    x = rnd(m, k).to(dt)
    w = None if w_mode == "none" else ((rnd(n, k) / k**0.5).to(dt) if w_mode == "plain"
                                       else (rnd(k, n) / k**0.5).to(dt).t())
    b = rnd(n).to(dt) if has_bias else None
    a, bb, dy = (rnd(r, k) / k**0.5).to(dt), (rnd(n, r) / r**0.5).to(dt), rnd(m, n).to(dt)
    seed = torch.tensor([123456789 + m], dtype=torch.int64, device=dev) if p > 0 else None
    s = 2.0
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    same = ref.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    same += ref.lora_linear_bwd(dy, x, w, a, bb, same[1], s, p, seed, True)
    truth = ref.lora_linear_fwd(f32(x), f32(w), f32(b), f32(a), f32(bb), s, p, seed)
    truth += ref.lora_linear_bwd(f32(dy), f32(x), f32(w), f32(a), f32(bb), truth[1], s, p, seed, True)
    impl = {"fused": (fused.fused_fwd, fused.fused_bwd), "composed": (composed.lora_linear_fwd,
                                                                       composed.lora_linear_bwd)}
    rows = []
    for path in paths:
        fwd, bwd = impl[path]
        _GEMMS.clear()
        got = fwd(x, w, b, a, bb, s, p, seed)
        got += bwd(dy, x, w, a, bb, got[1], s, p, seed, True)
        gemm = _gemm_kinds()
        for name, g_, r_, t_ in zip(("y", "u", "dx", "dA", "dB"), got, same, truth):
            rows.append(dict(common.check(label, name, g_, r_, t_, ATOL), path=path, gemm=gemm, dtype=dtype_name,
                             M=m, K=k, N=n, r=r, p=p))
    return rows


def grouped_case(case, dev):
    import torch

    label, m, k, ns, rs, ps, dtype_name, _ = case
    _, _, grouped, _, ref = _modules()
    dt = getattr(torch, dtype_name)
    rnd = _rand(torch, dev, m + k)
    x = rnd(m, k).to(dt)
    ws = [(rnd(n, k) / k**0.5).to(dt) for n in ns]
    bs = [None] * len(ns)
    a_s = [(rnd(r, k) / k**0.5).to(dt) for r in rs]
    b_s = [(rnd(n, r) / r**0.5).to(dt) for n, r in zip(ns, rs)]
    dys = [rnd(m, n).to(dt) for n in ns]
    seeds = torch.arange(1000, 1000 + len(ns), dtype=torch.int64, device=dev)
    ss = [2.0] * len(ns)
    f32 = lambda ts: [None if t is None else t.float() for t in ts]  # noqa: E731

    def run(impl, x_, ws_, a_, b_, dys_):
        ys, u = impl.lora_linear_grouped_fwd(x_, ws_, bs, a_, b_, ss, ps, seeds)
        dx, d_as, d_bs = impl.lora_linear_grouped_bwd(dys_, x_, ws_, a_, b_, u, ss, ps, seeds, True)
        return dict({f"y{g}": y for g, y in enumerate(ys)}, u=u, dx=dx,
                    **{f"dA{g}": d for g, d in enumerate(d_as)}, **{f"dB{g}": d for g, d in enumerate(d_bs)})

    _GEMMS.clear()
    got = run(grouped, x, ws, a_s, b_s, dys)
    gemm = _gemm_kinds()
    same, truth = run(ref, x, ws, a_s, b_s, dys), run(ref, x.float(), f32(ws), f32(a_s), f32(b_s), f32(dys))
    return [dict(common.check(label, name, got[name], same[name], truth[name], ATOL), path="grouped", gemm=gemm,
                 dtype=dtype_name, M=m, K=k, N=list(ns), r=list(rs), p=list(ps)) for name in got]


def _init_worker():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _task(kind: str, case, dev_type: str, stop_at: float):
    """One case in a worker; skipped when the step's deadline has passed before it starts."""
    import torch

    if time.time() >= stop_at:
        return [dict(case=case[0], output="(skipped: step budget spent)", ok=None)]
    t0 = time.monotonic()
    try:
        rows = (single_case if kind == "single" else grouped_case)(case, torch.device(dev_type))
    except Exception as e:  # report and keep going: one broken shape must not hide the rest
        rows = [dict(case=case[0], output="(exception)", ok=False, error=repr(e)[:500])]
    print(f"  {case[0]}: {time.monotonic() - t0:.1f}s (pid {os.getpid()})", flush=True)
    return rows


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--jobs", type=int, default=4, help="worker processes (1: in this process); default 4")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    torch, dev = common.setup(args, "device_check_kernels")
    deadline = common.Deadline(args.budget)
    single, grouped_cases = (SELF_TEST_SINGLE, SELF_TEST_GROUPED) if args.self_test else (SINGLE, GROUPED)
    tasks = [("single", c) for c in single if c[-1] or not args.quick]
    tasks += [("grouped", c) for c in grouped_cases if c[-1] or not args.quick]
    # Leave the last seconds of the budget for the table and the JSON.
    stop_at = time.time() + (args.budget - 5 if args.budget else 1e9)
    if args.jobs == 1:
        _init_worker()
        results = [_task(kind, c, dev.type, stop_at) for kind, c in tasks]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = [pool.submit(_task, kind, c, dev.type, stop_at) for kind, c in tasks]
            results = []
            for (_, c), f in zip(tasks, futures):
                try:
                    results.append(f.result())
                except Exception as e:  # a worker died (e.g. a CUDA fault): that case fails, the rest report
                    results.append([dict(case=c[0], output="(worker died)", ok=False, error=repr(e)[:500])])
    rows = [row for rs in results for row in rs]
    print(f"\n{'case':<30} {'path':<8} {'gemm':<11} {'dtype':<9} {'out':<4} {'kernel err':>11} {'ref err':>11} "
          f"{'bound':>9}  ok")
    for r in rows:
        if "kernel_err" in r:
            print(f"{r['case']:<30} {r['path']:<8} {r['gemm']:<11} {r['dtype']:<9} {r['output']:<4} "
                  f"{r['kernel_err']:>11.3e} {r['reference_err']:>11.3e} {r['bound']:>9.2e}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        else:
            print(f"{r['case']:<30} {r['output']} {r.get('error', '')}")
    rc = common.verdict(rows, deadline)
    common.write_json(args.out, "kernels.json", dict(common.metadata(torch, dev, args), ok=rc == 0, jobs=args.jobs,
                                                     seconds=deadline.elapsed(), rows=rows))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
