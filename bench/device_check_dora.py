"""GPU check, DoRA part: bf16 / fp16 correctness of every DoRA kernel (kernels/dora.py: row norm, factored
norm, shrink, fused forward, dU/dB/dm, dA, dgrad; p = 0 and p > 0) against the fp32 reference on real layer
shapes, then the issue's GPU goal: DoRA fwd+bwd vs our LoRA fwd+bwd at M = 8192, K = N = 4096, r = 16, bf16
(goal <= 1.15x). Prints a table, writes DIR/dora.json; exit 1 on a correctness failure (the timing is
reported, not judged). Kernels run with their default configs (LORA_TRITON_AUTOTUNE=0 unless set): the run
is mostly Triton compiles, short by design.

    python bench/device_check_dora.py [--quick] [--out DIR]     # on a GPU; --quick: 3 cases, p = 0 timing only
    TRITON_INTERPRET=1 python bench/device_check_dora.py --out DIR --small --device cpu   # logic check

Criterion per output: max|kernel - fp32| <= 2 max|reference - fp32| + atol * (1 + max|fp32|), the
reference being the PyTorch twin in the same low precision, fp32 the twin on the same inputs upcast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, M, K, N, r, p, transposed weight, bias, dtype)
CASES = [
    ("llama-8b q_proj", 8192, 4096, 4096, 16, 0.1, False, False, "bfloat16"),
    ("llama-8b up_proj r64", 2048, 4096, 14336, 64, 0.0, False, False, "bfloat16"),
    ("gpt2 c_attn Conv1D odd", 37, 768, 2304, 3, 0.1, True, True, "bfloat16"),
    ("odd sizes, M=1, r=1", 1, 1000, 3000, 1, 0.0, False, True, "bfloat16"),
    ("fp16 q_proj", 2048, 4096, 4096, 16, 0.1, False, True, "float16"),
]
QUICK = ("llama-8b q_proj", "gpt2 c_attn Conv1D odd", "odd sizes, M=1, r=1")
SMALL = [("small", 19, 40, 33, 3, 0.3, False, True, "float16"), ("small T", 1, 24, 20, 1, 0.0, True, True,
                                                                   "float32")]
ATOL = 2e-3


def _operands(m, k, n, r, transposed, has_bias, dt, dev, torch):
    g = torch.Generator(device=dev).manual_seed(m * 7 + k)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)
    w = (rnd(k, n) / k**0.5).t() if transposed else rnd(n, k) / k**0.5
    a, b = rnd(r, k) / k**0.5, rnd(n, r) * 0.05
    mag = (w + 2.0 * b @ a).norm(dim=1) * (1 + 0.1 * rnd(n))
    c = dict(x=rnd(m, k), w=w, bias=rnd(n) if has_bias else None, a=a, b=b, dy=rnd(m, n))
    return {key: None if v is None else v.to(dt) for key, v in c.items()}, mag.float()


def _run(impl, c, mag, s, p, seed):
    sq = impl.dora_weight_sq(c["w"])
    norm = impl.dora_weight_norm(c["w"], c["a"], c["b"], s, sq)
    y, u, y_pre = impl.dora_linear_fwd(c["x"], c["w"], c["bias"], c["a"], c["b"], mag, norm, s, p, seed)
    dx, d_a, d_b, d_m = impl.dora_linear_bwd(c["dy"], c["x"], c["w"], c["a"], c["b"], mag, norm, u, y_pre, s, p,
                                             seed, True)
    return dict(sq=sq, norm=norm, u=u, y=y, y_pre=y_pre, dx=dx, dA=d_a, dB=d_b, dm=d_m)


def check_case(case, kern, ref, torch, dev):
    label, m, k, n, r, p, transposed, has_bias, dtype = case
    c, mag = _operands(m, k, n, r, transposed, has_bias, getattr(torch, dtype), dev, torch)
    seed = torch.tensor([987654321 + m], dtype=torch.int64, device=dev) if p else None
    got, same = _run(kern, c, mag, 2.0, p, seed), _run(ref, c, mag, 2.0, p, seed)
    truth = _run(ref, {key: None if v is None else v.float() for key, v in c.items()}, mag, 2.0, p, seed)
    rows = []
    for name in got:
        t = truth[name].double()
        err = (got[name].double() - t).abs().max().item()
        ref_err = (same[name].double() - t).abs().max().item()
        bound = 2 * ref_err + ATOL * (1 + t.abs().max().item())
        ok = bool(torch.isfinite(got[name]).all()) and err <= bound
        rows.append(dict(case=label, output=name, err=err, ref_err=ref_err, bound=bound, ok=ok))
    return rows


def time_goal(torch, dev, m=8192, k=4096, n=4096, r=16, repeats=20, ps=(0.0, 0.1)):
    """Median seconds of one DoRA and one LoRA training step (fwd + bwd) through the ops, bf16."""
    from lora_triton.ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
    from lora_triton.ops.lora_linear import lora_linear

    dt = torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(n, k, device=dev) / k**0.5).to(dt)
    a = (torch.randn(r, k, device=dev) / k**0.5).requires_grad_(True)
    b = (torch.randn(n, r, device=dev) * 0.02).requires_grad_(True)
    mag = (w.float() + 2.0 * b.detach() @ a.detach()).norm(dim=1).requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    sq = dora_weight_sq(w)
    out = {}
    for p in ps:
        def lora_step(p=p):
            return torch.autograd.grad(lora_linear(x, w, None, a, b, 2.0, p), [x, a, b], dy)

        def dora_step(p=p):  # the norm recomputed every step, as after an optimizer step
            norm = dora_weight_norm(w, a, b, 2.0, sq)
            return torch.autograd.grad(dora_linear(x, w, None, a, b, mag, 2.0, p, weight_norm=norm), [x, a, b, mag], dy)

        steps = {"lora": lora_step, "dora": dora_step}
        times = {key: [] for key in steps}
        for _ in range(3):
            for fn in steps.values():
                fn()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for _ in range(repeats):
            for key, fn in steps.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t0)
        med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
        out[f"p={p:g}"] = dict(lora_s=med["lora"], dora_s=med["dora"], ratio=med["dora"] / med["lora"], goal=1.15)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="device_check_out", help="folder for dora.json")
    ap.add_argument("--quick", action="store_true", help="3 correctness cases, the p = 0 timing only")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (interpreter logic check)")
    args = ap.parse_args(argv)
    os.environ.setdefault("LORA_TRITON_AUTOTUNE", "0")
    started = time.perf_counter()
    import torch

    from lora_triton.kernels import dora as kern
    from lora_triton.reference import dora as ref

    cases = SMALL if args.small else [c for c in CASES if not args.quick or c[0] in QUICK]
    rows = [row for case in cases for row in check_case(case, kern, ref, torch, args.device)]
    for row in rows:
        print(f"{row['case']:<26} {row['output']:<6} err {row['err']:.3g}  ref {row['ref_err']:.3g}  "
              f"bound {row['bound']:.3g}  {'ok' if row['ok'] else 'FAIL'}")
    timing = None
    if args.device == "cuda":
        timing = time_goal(torch, args.device, repeats=10 if args.quick else 20,
                           ps=(0.0,) if args.quick else (0.0, 0.1))
        for key, t in timing.items():
            print(f"M=8192 K=N=4096 r=16 bf16 {key}: lora {t['lora_s'] * 1e3:.3f} ms, dora {t['dora_s'] * 1e3:.3f} ms, "
                  f"dora/lora {t['ratio']:.3f} (goal <= {t['goal']})")
    elapsed = time.perf_counter() - started
    print(f"device_check_dora: {len(rows)} checks, {sum(not r['ok'] for r in rows)} failed, {elapsed:.1f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "quick": args.quick,
           "elapsed_s": elapsed, "rows": rows, "timing": timing}
    (Path(args.out) / "dora.json").write_text(json.dumps(doc, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
