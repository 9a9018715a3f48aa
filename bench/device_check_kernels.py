"""GPU check, kernel part: bf16 (and one fp16) correctness of every fused LoRA kernel against
the fp32 reference on real layer shapes, plus a rough timing of the fused layer vs the frozen
base GEMMs on the headline shape. Prints a table, writes OUTDIR/kernels.json; exit 1 on failure.

    python bench/device_check_kernels.py OUTDIR [--autotune]

Runs in well under 2 minutes on an H200 with the default configs (LORA_TRITON_AUTOTUNE=0,
the default here); --autotune exercises the autotuner too (slower: every config compiles).
Criterion per output: max|kernel - fp32| <= 2 max|reference - fp32| + atol, where "reference"
is the PyTorch twin in the same low precision and fp32 uses the same bf16 inputs, the same
seed and therefore the same dropout mask (checked exactly through U).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, M, K, N, r, p, weight layout, bias, dtype)
CASES = [
    ("llama-8b q_proj train", 8192, 4096, 4096, 16, 0.1, "plain", False, "bfloat16"),
    ("llama-8b up_proj", 2048, 4096, 14336, 64, 0.0, "plain", False, "bfloat16"),
    ("llama-8b down_proj r256", 1024, 14336, 4096, 256, 0.05, "plain", False, "bfloat16"),
    ("decode M=1", 1, 4096, 4096, 8, 0.0, "plain", True, "bfloat16"),
    ("gpt2 c_attn Conv1D odd", 37, 768, 2304, 3, 0.1, "transposed", True, "bfloat16"),
    ("odd K,N, M=1000, r=1", 1000, 1000, 3000, 1, 0.2, "plain", True, "bfloat16"),
    ("LoRA-only (weight None)", 512, 2048, 1536, 32, 0.1, "none", False, "bfloat16"),
    ("fp16 q_proj", 4096, 4096, 4096, 16, 0.1, "plain", True, "float16"),
]
ATOL = 1e-3


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def run_case(label, m, k, n, r, p, w_mode, has_bias, dtype_name, kern, ref, torch, dev="cuda"):
    dt = getattr(torch, dtype_name)
    g = torch.Generator(device=dev).manual_seed(m * 7 + k)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)
    x = rnd(m, k).to(dt)
    w = None if w_mode == "none" else ((rnd(n, k) / k**0.5).to(dt) if w_mode == "plain"
                                       else (rnd(k, n) / k**0.5).to(dt).t())
    b = rnd(n).to(dt) if has_bias else None
    a = (rnd(r, k) / k**0.5).to(dt)
    bb = (rnd(n, r) / r**0.5).to(dt)
    dy = rnd(m, n).to(dt)
    seed = torch.tensor([123456789 + m], dtype=torch.int64, device=dev) if p > 0 else None
    s = 2.0
    f32 = lambda t: None if t is None else t.float()

    y, u = kern.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    dx, d_a, d_b = kern.lora_linear_bwd(dy, x, w, a, bb, u, s, p, seed, True)
    yr, ur = ref.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    dxr, d_ar, d_br = ref.lora_linear_bwd(dy, x, w, a, bb, ur, s, p, seed, True)
    yt, ut = ref.lora_linear_fwd(f32(x), f32(w), f32(b), f32(a), f32(bb), s, p, seed)
    dxt, d_at, d_bt = ref.lora_linear_bwd(f32(dy), f32(x), f32(w), f32(a), f32(bb), ut, s, p, seed, True)
    if dev == "cuda":
        torch.cuda.synchronize()
    rows = []
    for name, got, rv, tv in (("y", y, yr, yt), ("u", u, ur, ut), ("dx", dx, dxr, dxt),
                              ("dA", d_a, d_ar, d_at), ("dB", d_b, d_br, d_bt)):
        e_k, e_r = _err(got, tv), _err(rv, tv)
        atol = ATOL * (1.0 + tv.abs().max().item())
        ok = bool(torch.isfinite(got).all().item()) and e_k <= 2 * e_r + atol
        rows.append(dict(case=label, dtype=dtype_name, M=m, K=k, N=n, r=r, p=p, output=name,
                         kernel_err=e_k, reference_err=e_r, atol=atol, ok=ok))
    return rows


def time_headline(kern, torch):
    """Fused fwd / fwd+bwd vs the frozen base GEMMs (x W^T; dy W) on the headline shape."""
    from triton.testing import do_bench

    m, k, n, r, p = 8192, 4096, 4096, 16, 0.1
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / 64
    a = torch.randn(r, k, device=dev, dtype=dt) / 64
    bb = torch.randn(n, r, device=dev, dtype=dt) / 4
    dy = torch.randn(m, n, device=dev, dtype=dt)
    seed = torch.tensor([7], dtype=torch.int64, device=dev)
    _, u = kern.lora_linear_fwd(x, w, None, a, bb, 2.0, p, seed)
    t_base_f = do_bench(lambda: x @ w.t(), rep=60)
    t_base_b = do_bench(lambda: dy @ w, rep=60)
    t_fwd = do_bench(lambda: kern.lora_linear_fwd(x, w, None, a, bb, 2.0, p, seed), rep=60)
    t_bwd = do_bench(lambda: kern.lora_linear_bwd(dy, x, w, a, bb, u, 2.0, p, seed, True), rep=60)
    return dict(shape=dict(M=m, K=k, N=n, r=r, p=p, dtype="bfloat16"),
                base_fwd_ms=t_base_f, base_dgrad_ms=t_base_b, fused_fwd_ms=t_fwd, fused_bwd_ms=t_bwd,
                fwd_ratio=t_fwd / t_base_f, fwd_bwd_ratio=(t_fwd + t_bwd) / (t_base_f + t_base_b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--autotune", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("LORA_TRITON_AUTOTUNE", "1" if args.autotune else "0")
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not torch.cuda.is_available():
        print("device_check_kernels: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from lora_triton.kernels import lora_linear as kern
    from lora_triton.reference import lora_linear as ref

    t0 = time.time()
    rows = []
    for case in CASES:
        tc = time.time()
        try:
            rows += run_case(*case, kern=kern, ref=ref, torch=torch)
        except Exception as e:  # report and keep going: one broken shape must not hide the rest
            rows.append(dict(case=case[0], output="(exception)", ok=False, error=repr(e)[:500]))
        print(f"  {case[0]}: {time.time() - tc:.1f}s", flush=True)
    timing = None
    try:
        timing = time_headline(kern, torch)
    except Exception as e:
        timing = dict(error=repr(e)[:500])

    print(f"\n{'case':<26} {'dtype':<9} {'out':<4} {'kernel err':>11} {'ref err':>11} {'atol':>9}  ok")
    for r in rows:
        if "kernel_err" in r:
            print(f"{r['case']:<26} {r['dtype']:<9} {r['output']:<4} {r['kernel_err']:>11.3e} "
                  f"{r['reference_err']:>11.3e} {r['atol']:>9.2e}  {'ok' if r['ok'] else 'FAIL'}")
        else:
            print(f"{r['case']:<26} EXCEPTION {r['error']}")
    if timing and "error" not in timing:
        print(f"\nheadline bf16 M=8192 K=N=4096 r=16 p=0.1: fused fwd {timing['fused_fwd_ms']:.3f} ms "
              f"(base {timing['base_fwd_ms']:.3f}, x{timing['fwd_ratio']:.3f}); fwd+bwd x{timing['fwd_bwd_ratio']:.3f} "
              f"vs base fwd+dgrad")
    else:
        print(f"\ntiming failed: {timing}")
    ok = all(r["ok"] for r in rows)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(
        ok=ok, device=torch.cuda.get_device_name(), autotune=os.environ["LORA_TRITON_AUTOTUNE"],
        seconds=time.time() - t0, rows=rows, timing=timing), indent=2))
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in rows)}/{len(rows)} checks, {time.time() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
