"""GPU check, path part: the fused and the composed training paths against the frozen base on
cuBLAS and PEFT's layer, bf16, at the issue-12 shapes, and which path ``LORA_TRITON_PATH=auto``
picks on this GPU. Prints a table, writes OUTDIR/paths.json; exit 1 when a step fails.

    python bench/device_check_paths.py OUTDIR [--autotune] [--quick]

Shapes: M=8192 with (K, N) = (4096, 4096) and (4096, 14336), r = 16 and 64, p = 0 and 0.1.
Per shape (triton.testing.do_bench, median ms): base fwd = x W^T, base fwd+bwd = x W^T + dy W
(frozen weight: dgrad only); fused / composed fwd and fwd+bwd (the kernel launchers called
directly); PEFT fwd+bwd (its LoRA Linear under autograd, x requiring grad). Ratios are over the
frozen base. The auto decision is measured in a fresh cache (OUTDIR/path_cache) and printed with
the times it measured. Default configs (LORA_TRITON_AUTOTUNE=0) unless --autotune: the point is a
short run (< 100 s on an H200, est.); --quick runs the first shape only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(8192, 4096, 4096, r, p) for r in (16, 64) for p in (0.0, 0.1)] + [
    (8192, 4096, 14336, r, p) for r in (16, 64) for p in (0.0, 0.1)]


def _peft_layer(torch, w, a, bb, p, scaling):
    """PEFT's LoRA Linear on the same frozen weight and adapter tensors (bf16 like the base)."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception as e:  # peft missing or incompatible: reported, not fatal
        return None, repr(e)[:200]
    nn = torch.nn
    n, k = w.shape
    r = a.shape[0]
    base = nn.Linear(k, n, bias=False, device="meta")
    base.weight = nn.Parameter(w, requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=p)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=scaling * r, lora_dropout=p)
    layer.lora_A["default"].weight = nn.Parameter(a.clone())
    layer.lora_B["default"].weight = nn.Parameter(bb.clone())
    layer.train(True)
    return layer, None


def measure(shape, torch, kern, composed, path_choice, do_bench, cache_dir, dev="cuda", dt=None):
    m, k, n, r, p = shape
    dt, s = dt or torch.bfloat16, 2.0
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / 64
    a = torch.randn(r, k, device=dev, dtype=dt) / 64
    bb = torch.randn(n, r, device=dev, dtype=dt) / 8
    dy = torch.randn(m, n, device=dev, dtype=dt)
    seed = torch.tensor([11], dtype=torch.int64, device=dev) if p > 0 else None
    bench = lambda fn: do_bench(fn, warmup=5, rep=40, return_mode="median")
    fwd_args = (x, w, None, a, bb, s, p, seed)
    _, u = kern.fused_fwd(*fwd_args)
    bwd_args = (dy, x, w, a, bb, u, s, p, seed, True)
    row = dict(M=m, K=k, N=n, r=r, p=p, dtype=str(dt).removeprefix("torch."))
    row["base_fwd_ms"] = bench(lambda: x @ w.t())
    row["base_fwd_bwd_ms"] = row["base_fwd_ms"] + bench(lambda: dy @ w)
    for name, f, b in (("fused", kern.fused_fwd, kern.fused_bwd),
                       ("composed", composed.lora_linear_fwd, composed.lora_linear_bwd)):
        row[f"{name}_fwd_ms"] = bench(lambda f=f: f(*fwd_args))
        row[f"{name}_fwd_bwd_ms"] = row[f"{name}_fwd_ms"] + bench(lambda b=b: b(*bwd_args))
    layer, why = _peft_layer(torch, w, a, bb, p, s)
    if layer is not None:
        xg = x.detach().requires_grad_(True)

        def peft_step():
            xg.grad = None  # no gradient accumulation across reps (an extra [M, K] add)
            layer(xg).backward(dy)

        row["peft_fwd_bwd_ms"] = bench(peft_step)
    else:
        row["peft_skipped"] = why
    os.environ["LORA_TRITON_PATH"] = "auto"
    os.environ["LORA_TRITON_CACHE_DIR"] = str(cache_dir)
    row["auto_fwd"] = path_choice.pick("fwd", x, w, a, bb, p, fwd_args)
    row["auto_bwd"] = path_choice.pick("bwd", x, w, a, bb, p, bwd_args)
    if dev == "cuda":
        table = json.loads(Path(path_choice.cache_file(torch.cuda.get_device_name())).read_text())
        row["auto_measured_us"] = {op: table[path_choice.key(op, x, w, a, bb, p)]["us"] for op in ("fwd", "bwd")}
    for name in ("fused", "composed"):
        row[f"{name}_fwd_x"] = row[f"{name}_fwd_ms"] / row["base_fwd_ms"]
        row[f"{name}_fwd_bwd_x"] = row[f"{name}_fwd_bwd_ms"] / row["base_fwd_bwd_ms"]
    if "peft_fwd_bwd_ms" in row:
        row["peft_fwd_bwd_x"] = row["peft_fwd_bwd_ms"] / row["base_fwd_bwd_ms"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("LORA_TRITON_AUTOTUNE", "1" if args.autotune else "0")
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not torch.cuda.is_available():
        print("device_check_paths: no CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from lora_triton.kernels import composed, path_choice
    from lora_triton.kernels import lora_linear as kern

    out = Path(args.outdir)
    cache_dir = out / "path_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob("paths-*.json"):
        old.unlink()  # a fresh decision, measured here
    t0 = time.time()
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        tc = time.time()
        m, k, n, r, p = shape
        try:
            rows.append(measure(shape, torch, kern, composed, path_choice, do_bench, cache_dir))
        except Exception as e:  # report and keep going
            rows.append(dict(M=m, K=k, N=n, r=r, p=p, error=repr(e)[:500]))
        print(f"  M={m} K={k} N={n} r={r} p={p}: {time.time() - tc:.1f}s", flush=True)
    print(f"\n{'K x N':<11} {'r':>3} {'p':>4} | {'base fwd':>8} {'fused':>6} {'comp':>6} | {'base f+b':>8} "
          f"{'fused':>6} {'comp':>6} {'peft':>6} | auto fwd/bwd   (ratios over the frozen base; ms)")
    for row in rows:
        head = f"{row['K']}x{row['N']:<6} {row['r']:>3} {row['p']:>4}"
        if "error" in row:
            print(f"{head} | ERROR {row['error']}")
            continue
        peft = f"{row['peft_fwd_bwd_x']:>6.3f}" if "peft_fwd_bwd_x" in row else f"{'-':>6}"
        print(f"{head} | {row['base_fwd_ms']:>8.3f} {row['fused_fwd_x']:>6.3f} {row['composed_fwd_x']:>6.3f} | "
              f"{row['base_fwd_bwd_ms']:>8.3f} {row['fused_fwd_bwd_x']:>6.3f} {row['composed_fwd_bwd_x']:>6.3f} "
              f"{peft} | {row['auto_fwd']}/{row['auto_bwd']}")
    ok = bool(rows) and all("error" not in row for row in rows)
    (out / "paths.json").write_text(json.dumps(dict(
        ok=ok, device=torch.cuda.get_device_name(), autotune=os.environ["LORA_TRITON_AUTOTUNE"],
        date=time.strftime("%Y-%m-%d", time.gmtime()), seconds=time.time() - t0, rows=rows), indent=2))
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(rows)} shapes, {time.time() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
