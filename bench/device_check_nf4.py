"""GPU check, QLoRA part: the 4-bit GEMMs of kernels/nf4.py (the split-K GEMV the launcher picks for
M <= 16, the tiled GEMM above, the dgrad) in bf16 against the chunked PyTorch twin and fp32 (the team's 2x
rule, NaN-poisoned outputs), then timed against bitsandbytes' dequantize_4bit + cuBLAS (our reference
dequantization where bnb is absent) and the dense bf16 GEMM, at K = N = 4096. Writes OUT/nf4.json.

    python bench/device_check_nf4.py [--quick] [--out DIR] [--budget S] [--autotune] [--self-test]

Cases: M = 1, 8, 16, 128, 1024, 8192 (``--quick``: 1, 16, 4096, as device_check.sh runs it). Goals (issue
11): decode (M <= 16) moves the packed weight at >= 70% of HBM bandwidth (H200 copy ceiling ~4.3 TB/s),
prefill within 1.25x of the bf16 cuBLAS GEMM. Decode rows are CUDA-graph replays: a 4096x4096 NF4 weight
is 8.6 MB, ~2 us at 4.3 TB/s, less than one Python launch; the calls cycle over 8 copies of the weight so
that each reads HBM, not the 50 MB L2. Decode rows also time the tiled GEMM forced at the same M and (not
with --quick) four GEMV tile configs at M = 1, which say what GEMV_CONFIG should be. Default kernel configs
(LORA_TRITON_AUTOTUNE=0) unless --autotune: well under a minute on an H200.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device_common as common  # noqa: E402

HBM_BYTES_PER_S = 4.3e12
FULL = dict(k=4096, n=4096, ms=(1, 8, 16, 128, 1024, 8192), r=16, dtype="bfloat16")
QUICK = dict(FULL, ms=(1, 16, 4096))
SELF_TEST = dict(k=64, n=40, ms=(1, 17), r=4, dtype="float16")
# GEMV tiles tried at M = 1 (the first is kernels/nf4.py's GEMV_CONFIG): BLOCK_M, BLOCK_N, BLOCK_K, warps, stages.
GEMV_SWEEP = ((16, 64, 64, 8, 4), (16, 32, 64, 4, 5), (16, 64, 128, 8, 3), (16, 128, 64, 8, 4))


def _graph_s(fn, device) -> float:
    """Seconds per call, replayed from a CUDA graph (no launch overhead); one plain call on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") / 1e3
    return common.bench_ms(fn, device) / 1e3


def run(args) -> int:
    torch, dev = common.setup(args, "device_check_nf4")
    from lora_triton.kernels import nf4 as kern
    from lora_triton.nn.nf4_linear import NF4Linear
    from lora_triton.reference import nf4 as ref

    plain_empty = kern._empty
    common.poison_empty(kern)  # for the checks; timings use the plain allocation (a NaN fill is a kernel)
    poisoned_empty = kern._empty
    cfg = SELF_TEST if args.self_test else (QUICK if args.quick else FULL)
    deadline = common.Deadline(args.budget)
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
    timings = []

    def case(m):
        kern._empty = poisoned_empty  # (again: a case that raised may have left the plain one)
        x = torch.randn(m, k, generator=g).to(dev, dtype)
        u = torch.randn(m, r, generator=g).to(dev, dtype)
        lb = (torch.randn(n, r, generator=g) / r**0.5).to(dev, dtype)
        la = (torch.randn(r, k, generator=g) / k**0.5).to(dev, dtype)
        dy = torch.randn(m, n, generator=g).to(dev, dtype)
        y32 = x.float() @ w_dense.float().t() + 0.5 * u.float() @ lb.float().t()
        dx32 = dy.float() @ w_dense.float() + u.float() @ la.float()
        decode = m <= kern.GEMV_MAX_M
        label = f"M={m} ({'gemv' if decode else 'gemm'})"
        rows = [common.check(label, "y", kern.nf4_linear_fwd(x, w, None, u, lb, 0.5),
                             ref.nf4_linear_fwd(x, w, None, u, lb, 0.5), y32, 1e-3),
                common.check(label, "dx", kern.nf4_linear_dgrad(dy, w, u, la), ref.nf4_linear_dgrad(dy, w, u, la),
                             dx32, 1e-3)]
        kern._empty = plain_empty
        # Decode: calls cycle over W copies bigger than L2 together (8 x 8.6 MB packed, 4 x 33.5 MB dense).
        ring = itertools.cycle([w] + [w._replace(packed=w.packed.clone(), absmax=w.absmax.clone())
                                      for _ in range(7 if decode else 0)])
        dense = itertools.cycle([w_dense] + [w_dense.clone() for _ in range(3 if decode else 0)])
        fwd = lambda: kern.nf4_linear_fwd(x, next(ring), None, None, None, 0.0)  # noqa: E731
        t = (lambda f: _graph_s(f, dev)) if decode else (lambda f: common.bench_ms(f, dev) / 1e3)
        row = dict(M=m, K=k, N=n, dtype=cfg["dtype"], path="gemv" if decode else "gemm", fused_fwd_s=t(fwd),
                   fused_dgrad_s=common.bench_ms(lambda: kern.nf4_linear_dgrad(dy, w, None, None), dev) / 1e3,
                   dequant_matmul_s=common.bench_ms(lambda: x @ dequant().t(), dev) / 1e3,
                   dense_matmul_s=t(lambda: x @ next(dense).t()))
        if decode:  # the tiled GEMM at the same M; the GEMV tile sweep at M = 1 (full runs)
            saved_max, kern.GEMV_MAX_M = kern.GEMV_MAX_M, 0
            try:
                row["gemm_path_fwd_s"] = t(fwd)
            finally:
                kern.GEMV_MAX_M = saved_max
            if m == 1 and dev.type == "cuda" and not args.quick:
                saved, row["gemv_sweep_s"] = dict(kern.GEMV_CONFIG), {}
                try:
                    for bm, bn, bk, warps, stages in GEMV_SWEEP:
                        kern.GEMV_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                num_stages=stages)
                        row["gemv_sweep_s"][f"{bm}x{bn}x{bk} w{warps} s{stages}"] = t(fwd)
                finally:
                    kern.GEMV_CONFIG.clear()
                    kern.GEMV_CONFIG.update(saved)
        row["packed_bandwidth_frac"] = packed_bytes / row["fused_fwd_s"] / HBM_BYTES_PER_S
        row["vs_dense"] = row["fused_fwd_s"] / row["dense_matmul_s"]
        timings.append(row)
        return rows

    checks = common.run_cases([(m,) for m in cfg["ms"]], lambda c: case(c[0]), deadline, label=lambda c: f"M={c[0]}")
    where = "interpreter, CPU" if args.self_test else torch.cuda.get_device_name(0)
    print(f"NF4 GEMMs ({where}), K={k} N={n}, {cfg['dtype']}; baseline: {dequant_name}")
    print(f"{'M':>6} {'path':>5} {'fused fwd':>11} {'gemm path':>11} {'dgrad':>11} {'deq+mm':>11} "
          f"{'dense mm':>11} {'HBM frac':>9} {'vs dense':>9}")
    for row in timings:
        gemm = f"{row['gemm_path_fwd_s'] * 1e6:>9.1f}us" if "gemm_path_fwd_s" in row else f"{'-':>11}"
        print(f"{row['M']:>6} {row['path']:>5} {row['fused_fwd_s'] * 1e6:>9.1f}us {gemm} "
              f"{row['fused_dgrad_s'] * 1e6:>9.1f}us {row['dequant_matmul_s'] * 1e6:>9.1f}us "
              f"{row['dense_matmul_s'] * 1e6:>9.1f}us {row['packed_bandwidth_frac']:>9.2f} {row['vs_dense']:>8.2f}x")
        for name, sec in row.get("gemv_sweep_s", {}).items():
            print(f"       GEMV {name}: {sec * 1e6:.1f}us, HBM frac {packed_bytes / sec / HBM_BYTES_PER_S:.2f}")
    for c in checks:
        if c.get("ok") is False:
            print("FAILED:", c, file=sys.stderr)
    common.write_json(args.out, "nf4.json", dict(common.metadata(torch, dev, args), checks=checks, rows=timings,
                                                 baseline=dequant_name, packed_bytes=packed_bytes,
                                                 gemv_config=dict(kern.GEMV_CONFIG)))
    return common.verdict(checks, deadline)


def main(argv=None) -> int:
    return run(common.parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
