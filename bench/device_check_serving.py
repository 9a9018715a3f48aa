"""GPU-only check of the multi-adapter serving kernels (bf16 vs the fp32 reference), < 1 minute on an H200.

Usage: python bench/device_check_serving.py OUT_DIR  -> OUT_DIR/device_check_serving.json

Checks, on real shapes (hidden 4096, up to 64 adapters of mixed ranks 8..64, k = 1 or 2 slots):
* bf16 kernel output vs the pure-PyTorch reference in fp32 on the same bf16 inputs (both paths:
  fused decode and shrink/expand with split-K), relative to the LoRA term's magnitude;
* rows without an adapter are bit-equal to F.linear;
* a decode step (T = 16) captured in a CUDA graph replays to the eager result (no host sync);
* timings (CUDA events, median of 50) for decode and for 256 tokens on 256 distinct adapters,
  with the implied bandwidth of the adapter bytes moved.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    os.environ["LORA_TRITON_BACKEND"] = "triton"
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from lora_triton.kernels import multi_lora as kern
    from lora_triton.ops.multi_lora import multi_lora_linear
    from lora_triton.reference import multi_lora as ref

    dev, bf = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    results, ok = {"gpu": torch.cuda.get_device_name(), "cases": [], "timings": {}}, True

    def setup(t, k_in, n, num, r_max, slots, rank_choices):
        x = torch.randn(t, k_in, device=dev, generator=g).to(bf)
        w = (torch.randn(n, k_in, device=dev, generator=g) / k_in**0.5).to(bf)
        b = torch.randn(n, device=dev, generator=g).to(bf)
        a = (torch.randn(num, r_max, k_in, device=dev, generator=g) / k_in**0.5).to(bf)
        bb = (torch.randn(num, n, r_max, device=dev, generator=g) / r_max**0.5).to(bf)
        s = torch.rand(num, device=dev, generator=g) + 0.5
        ranks = torch.tensor([rank_choices[i % len(rank_choices)] for i in range(num)], dtype=torch.int32,
                             device=dev)
        ids = torch.randint(-1, num, (t, slots), device=dev, generator=g)
        wts = torch.rand(t, slots, device=dev, generator=g) if slots > 1 else None
        return x, w, b, a, bb, s, ids, ranks, wts

    cases = [  # (T, in, out, adapters, r_max, slots, ranks, mode)
        (1, 4096, 4096, 64, 64, 1, (8, 16, 64), "fused"),
        (16, 4096, 4096, 64, 64, 1, (8, 16, 64), "fused"),
        (16, 4096, 11008, 16, 16, 2, (16,), "fused"),
        (16, 4096, 4096, 64, 64, 1, (8, 16, 64), "split"),
        (256, 4096, 4096, 256, 16, 1, (16,), "split"),
        (2048, 4096, 4096, 32, 64, 1, (8, 16, 32, 64), "split"),
        (512, 4096, 14336, 8, 32, 2, (8, 32), "split"),
    ]
    for t, k_in, n, num, r_max, slots, rank_choices, mode in cases:
        x, w, b, a, bb, s, ids, ranks, wts = setup(t, k_in, n, num, r_max, slots, rank_choices)
        if t > 1:
            ids[0] = -1
        y = kern.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, wts, mode=mode)
        exp = ref.multi_lora_linear(x.float(), w.float(), b.float(), a.float(), bb.float(), s, ids, ranks,
                                    wts)
        base = F.linear(x, w, b)
        lora = (exp - base.float()).abs().max().item()
        err = (y.float() - exp).abs().max().item()
        base_rows_equal = bool(torch.equal(y[(ids < 0).all(1)], base[(ids < 0).all(1)]))
        # y is rounded to bf16 twice (cuBLAS base, then base + LoRA): up to 2 ulp = 2^-6 relative;
        # U is rounded to bf16 before the expand MMA: ~1% of the LoRA term. A wrong adapter, slot or
        # rank tile gives errors of the LoRA term's size.
        tol = 2.0**-6 * exp.abs().max().item() + 0.01 * lora
        good = err <= tol and base_rows_equal
        ok &= good
        results["cases"].append(dict(T=t, in_features=k_in, out_features=n, adapters=num, r_max=r_max, slots=slots,
                                     ranks=list(rank_choices), mode=mode, max_abs_err=err, tol=tol,
                                     lora_term_max=lora, base_rows_bit_equal=base_rows_equal, ok=good))
        print(results["cases"][-1], flush=True)

    # CUDA graph capture of one decode step: the plan (sort, tiles) is all device ops.
    x, w, b, a, bb, s, ids, ranks, _ = setup(16, 4096, 4096, 64, 64, 1, (8, 16, 64))
    eager = multi_lora_linear(x, w, b, a, bb, s, ids, ranks, validate=False)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                multi_lora_linear(x, w, b, a, bb, s, ids, ranks, validate=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = multi_lora_linear(x, w, b, a, bb, s, ids, ranks, validate=False)
        graph.replay()
        torch.cuda.synchronize()
        graph_ok = bool(torch.equal(out, eager))
        results["cuda_graph"] = {"captured": True, "replay_equals_eager": graph_ok}
        results["timings"]["decode_T16_graph_us"] = _time(graph.replay)
        base_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(base_graph):
            F.linear(x, w, b)
        results["timings"]["decode_T16_base_graph_us"] = _time(base_graph.replay)
    except Exception as exc:  # report, do not hide
        graph_ok = False
        results["cuda_graph"] = {"captured": False, "error": repr(exc)[:500]}
    ok &= graph_ok

    # 256 tokens on 256 distinct adapters, r = 16: bandwidth of the adapter bytes.
    x, w, b, a, bb, s, _, ranks, _ = setup(256, 4096, 4096, 256, 16, 1, (16,))
    ids = torch.randperm(256, device=dev).reshape(256, 1)
    us = _time(lambda: kern.multi_lora_linear(x, None, None, a, bb, s, ids, ranks))
    moved = (a.numel() + bb.numel()) * 2 + x.numel() * 2 + 256 * 4096 * 2 * 2
    results["timings"]["distinct256_lora_only_us"] = us
    results["timings"]["distinct256_TBps"] = moved / us / 1e6
    results["ok"] = bool(ok)
    with open(os.path.join(out_dir, "device_check_serving.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({"ok": ok, "timings": results["timings"], "cuda_graph": results.get("cuda_graph")}))
    return 0 if ok else 1


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    t0 = time.time()
    rc = main(sys.argv[1] if len(sys.argv) > 1 else "device_out")
    print(f"done in {time.time() - t0:.1f}s")
    sys.exit(rc)
