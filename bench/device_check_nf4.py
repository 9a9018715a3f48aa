"""GPU check, QLoRA part: bf16 correctness of the fused 4-bit GEMMs (kernels/nf4.py: the split-K GEMV the
launcher picks for M <= 16, the tiled GEMM above, the dgrad) against the chunked PyTorch twin and fp32,
then their timing against dequantize + cuBLAS (bitsandbytes' dequantize_4bit when installed, else our
reference dequantization) and the plain bf16 GEMM, at K = N = 4096 and M = 1..8192; at M <= 16 also the
tiled GEMM forced (GEMV vs GEMM) and a small sweep of GEMV tile configs. Prints a table, writes
OUT/nf4.json; exit 1 when a correctness check fails.

    python bench/device_check_nf4.py [--quick] [--out DIR] [--autotune] [--tiny]

Goals (issue 11): decode (M <= 16) moves the packed weight at >= 70% of HBM bandwidth (H200 copy
ceiling ~4.3 TB/s), prefill within 1.25x of the bf16 cuBLAS GEMM. Decode times are CUDA-graph replays
(``triton.testing.do_bench_cudagraph``): a 4096x4096 NF4 weight is 8.6 MB, ~2 us at 4.3 TB/s, less than
one Python launch. Default configs (LORA_TRITON_AUTOTUNE=0) keep the run well under 60 s on an H200;
``--autotune`` tunes the tiled GEMMs (slower). ``--quick``: M = 1, 16, 4096 only. ``--tiny`` runs small
shapes on CPU through Triton's interpreter (fp16 instead of bf16), as the test suite does, to keep the
script working.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HBM_BYTES_PER_S = 4.3e12
FULL = dict(k=4096, n=4096, ms=(1, 8, 16, 128, 1024, 8192), r=16, dtype="bfloat16")
QUICK = dict(FULL, ms=(1, 16, 4096))
TINY = dict(k=64, n=40, ms=(1, 17), r=4, dtype="float16")
# GEMV tiles tried at M = 1 (the first is kernels/nf4.py's GEMV_CONFIG): the sweep says which to keep.
GEMV_SWEEP = ((16, 64, 64, 8, 4), (16, 32, 64, 4, 5), (16, 64, 128, 8, 3), (16, 128, 64, 8, 4))


def _time(fn, cuda: bool, reps: int = 20, graph: bool = False) -> float:
    if cuda:
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=reps * 2) / 1e3
        return triton.testing.do_bench(fn, warmup=10, rep=reps * 5) / 1e3
    t0 = time.perf_counter()  # --tiny (interpreter): one call keeps the path working; the time means nothing
    fn()
    return time.perf_counter() - t0


def run(outdir: str, tiny: bool, quick: bool = False, autotune: bool = False) -> int:
    if tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not autotune:
        os.environ.setdefault("LORA_TRITON_AUTOTUNE", "0")
    import torch

    from lora_triton.kernels import nf4 as kern
    from lora_triton.nn.nf4_linear import NF4Linear
    from lora_triton.reference import nf4 as ref

    cfg = TINY if tiny else (QUICK if quick else FULL)
    cuda = not tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg["dtype"])
    k, n, r = cfg["k"], cfg["n"], cfg["r"]
    g = torch.Generator().manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(n, k, generator=g) / k**0.5).to(dev)
    w = layer.nf4_weight()
    w_dense = layer.dequantize(dtype)
    packed_bytes = layer.weight_bytes()
    try:
        import bitsandbytes.functional as bnbf

        qs = bnbf.QuantState.from_dict({k_[len("weight."):]: v for k_, v in layer.state_dict().items()
                                        if k_.startswith("weight.")}, device=dev)
        dequant = lambda: bnbf.dequantize_4bit(layer.weight, qs).to(dtype)  # noqa: E731
        dequant_name = "bnb dequantize_4bit + matmul"
    except Exception:  # bitsandbytes absent or without this device's kernels
        dequant = lambda: layer.dequantize(dtype)  # noqa: E731
        dequant_name = "reference dequantize + matmul"
    rows, failures = [], []
    for m in cfg["ms"]:
        x = torch.randn(m, k, generator=g).to(dev, dtype)
        u = torch.randn(m, r, generator=g).to(dev, dtype)
        lb = (torch.randn(n, r, generator=g) / r**0.5).to(dev, dtype)
        la = (torch.randn(r, k, generator=g) / k**0.5).to(dev, dtype)
        dy = torch.randn(m, n, generator=g).to(dev, dtype)
        y = kern.nf4_linear_fwd(x, w, None, u, lb, 0.5)
        y_ref = ref.nf4_linear_fwd(x, w, None, u, lb, 0.5)
        y32 = x.float() @ w_dense.float().t() + 0.5 * u.float() @ lb.float().t()
        dx = kern.nf4_linear_dgrad(dy, w, u, la)
        dx_ref = ref.nf4_linear_dgrad(dy, w, u, la)
        dx32 = dy.float() @ w_dense.float() + u.float() @ la.float()
        ok = True
        for name, got, same, exact in (("y", y, y_ref, y32), ("dx", dx, dx_ref, dx32)):
            err, ref_err = (got.float() - exact).abs().max().item(), (same.float() - exact).abs().max().item()
            if not err <= 2 * ref_err + 1e-3 * (1 + exact.abs().max().item()):
                ok = False
                failures.append(f"M={m} {name}: kernel err {err:.3g} vs reference err {ref_err:.3g}")
        decode = m <= kern.GEMV_MAX_M
        # Decode calls cycle through copies of W bigger than L2 together (H200: 50 MB), so every call
        # reads its weight from HBM: 8 x 8.6 MB packed, 4 x 33.5 MB dense.
        w_ring = itertools.cycle([w] + [w._replace(packed=w.packed.clone(), absmax=w.absmax.clone())
                                        for _ in range(7 if decode else 0)])
        dense_ring = itertools.cycle([w_dense] + [w_dense.clone() for _ in range(3 if decode else 0)])
        fwd = lambda x=x, ring=w_ring: kern.nf4_linear_fwd(x, next(ring), None, None, None, 0.0)  # noqa: E731
        t_fused = _time(fwd, cuda, graph=decode)
        t_deq = _time(lambda x=x: x @ dequant().t(), cuda)
        t_dense = _time(lambda x=x, ring=dense_ring: x @ next(ring).t(), cuda, graph=decode)
        t_dgrad = _time(lambda dy=dy: kern.nf4_linear_dgrad(dy, w, None, None), cuda)
        row = dict(M=m, K=k, N=n, dtype=cfg["dtype"], ok=ok, path="gemv" if decode else "gemm", fused_fwd_s=t_fused,
                   fused_dgrad_s=t_dgrad, dequant_matmul_s=t_deq, dense_matmul_s=t_dense,
                   packed_bandwidth_frac=packed_bytes / t_fused / HBM_BYTES_PER_S, vs_dense=t_fused / t_dense)
        if decode:  # the tiled GEMM at the same M, and the GEMV tile sweep at M = 1
            saved_max, kern.GEMV_MAX_M = kern.GEMV_MAX_M, 0
            row["gemm_path_fwd_s"] = _time(fwd, cuda, graph=True)
            kern.GEMV_MAX_M = saved_max
            if m == 1 and cuda:
                saved_cfg, sweep = dict(kern.GEMV_CONFIG), {}
                for bm, bn, bk, warps, stages in GEMV_SWEEP:
                    kern.GEMV_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                    sweep[f"{bm}x{bn}x{bk} w{warps} s{stages}"] = _time(fwd, cuda, graph=True)
                kern.GEMV_CONFIG.clear()
                kern.GEMV_CONFIG.update(saved_cfg)
                row["gemv_sweep_s"] = sweep
        rows.append(row)
    print(f"fused NF4 GEMM ({'interpreter, CPU' if tiny else torch.cuda.get_device_name(0)}), "
          f"K={k} N={n}, {cfg['dtype']}; baseline: {dequant_name}")
    print(f"{'M':>6} {'ok':>3} {'path':>5} {'fused fwd':>11} {'gemm path':>11} {'dgrad':>11} {'deq+mm':>11} "
          f"{'dense mm':>11} {'HBM frac':>9} {'vs dense':>9}")
    for row in rows:
        gemm = f"{row['gemm_path_fwd_s'] * 1e6:>9.1f}us" if "gemm_path_fwd_s" in row else f"{'-':>11}"
        print(f"{row['M']:>6} {'yes' if row['ok'] else 'NO':>3} {row['path']:>5} {row['fused_fwd_s'] * 1e6:>9.1f}us "
              f"{gemm} {row['fused_dgrad_s'] * 1e6:>9.1f}us {row['dequant_matmul_s'] * 1e6:>9.1f}us "
              f"{row['dense_matmul_s'] * 1e6:>9.1f}us {row['packed_bandwidth_frac']:>9.2f} {row['vs_dense']:>8.2f}x")
        for name, t in row.get("gemv_sweep_s", {}).items():
            print(f"       GEMV {name}: {t * 1e6:.1f}us, HBM frac {packed_bytes / t / HBM_BYTES_PER_S:.2f}")
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "nf4.json"), "w", encoding="utf-8") as f:
        json.dump(dict(rows=rows, failures=failures, baseline=dequant_name, tiny=tiny, quick=quick,
                       autotune=autotune, packed_bytes=packed_bytes, gemv_config=kern.GEMV_CONFIG), f, indent=2)
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "nf4"),
                   help="output folder (default bench/results/nf4)")
    p.add_argument("--quick", action="store_true", help="M = 1, 16, 4096 only")
    p.add_argument("--autotune", action="store_true", help="autotune the tiled GEMMs (default configs otherwise)")
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU through the interpreter")
    args = p.parse_args(argv)
    return run(args.out, args.tiny, args.quick, args.autotune)


if __name__ == "__main__":
    sys.exit(main())
