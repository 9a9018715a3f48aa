"""GPU check, multi-adapter serving kernels (kernels/multi_lora.py): bf16 vs the fp32 reference, a CUDA-graph
decode step, and the decode / 256-distinct-adapter timings. Writes OUT/device_check_serving.json; exit 1 on failure.

    python bench/device_check_serving.py [--quick] [--out DIR] [--budget S] [--self-test]

Checks, on real shapes (hidden 4096, up to 256 adapters of mixed ranks 8..64, k = 1 or 2 slots):
* bf16 kernel output vs the pure-PyTorch reference in fp32 on the same bf16 inputs (both paths:
  fused decode and shrink/expand with split-K), relative to the LoRA term's magnitude;
* rows without an adapter are bit-equal to F.linear;
* a decode step (T = 16) captured in a CUDA graph replays to the eager result (no host sync);
* timings (triton.testing.do_bench, median) for that decode step against the base GEMM's graph, and for
  256 tokens on 256 distinct adapters (r = 16) with the implied bandwidth of the bytes moved.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device_common as common  # noqa: E402

# (T, in, out, adapters, r_max, slots, ranks, mode, in --quick)
CASES = [
    (1, 4096, 4096, 64, 64, 1, (8, 16, 64), "fused", True),
    (16, 4096, 4096, 64, 64, 1, (8, 16, 64), "fused", False),
    (16, 4096, 11008, 16, 16, 2, (16,), "fused", True),
    (16, 4096, 4096, 64, 64, 1, (8, 16, 64), "split", False),
    (256, 4096, 4096, 256, 16, 1, (16,), "split", True),
    (2048, 4096, 4096, 32, 64, 1, (8, 16, 32, 64), "split", True),
    (512, 4096, 14336, 8, 32, 2, (8, 32), "split", False),
]
SELF_TEST = [(3, 40, 24, 3, 8, 1, (1, 8), "fused", True), (37, 40, 24, 4, 16, 2, (3, 16), "split", True)]
DECODE = (16, 4096, 4096, 64, 64, 1, (8, 16, 64))
DISTINCT = (256, 4096, 4096, 256, 16, 1, (16,))
SELF_TEST_DECODE, SELF_TEST_DISTINCT = (4, 40, 24, 3, 8, 1, (1, 8)), (8, 40, 24, 8, 4, 1, (4,))


def _setup(torch, dev, dt, g, t, k_in, n, num, r_max, slots, rank_choices):
    x = torch.randn(t, k_in, device=dev, generator=g).to(dt)
    w = (torch.randn(n, k_in, device=dev, generator=g) / k_in**0.5).to(dt)
    b = torch.randn(n, device=dev, generator=g).to(dt)
    a = (torch.randn(num, r_max, k_in, device=dev, generator=g) / k_in**0.5).to(dt)
    bb = (torch.randn(num, n, r_max, device=dev, generator=g) / r_max**0.5).to(dt)
    s = torch.rand(num, device=dev, generator=g) + 0.5
    ranks = torch.tensor([rank_choices[i % len(rank_choices)] for i in range(num)], dtype=torch.int32, device=dev)
    ids = torch.randint(-1, num, (t, slots), device=dev, generator=g)
    wts = torch.rand(t, slots, device=dev, generator=g) if slots > 1 else None
    return x, w, b, a, bb, s, ids, ranks, wts


def check_case(case, torch, dev, dt, g):
    import torch.nn.functional as F

    from lora_triton.kernels import multi_lora as kern
    from lora_triton.reference import multi_lora as ref

    t, k_in, n, num, r_max, slots, rank_choices, mode, _ = case
    x, w, b, a, bb, s, ids, ranks, wts = _setup(torch, dev, dt, g, t, k_in, n, num, r_max, slots, rank_choices)
    if t > 1:
        ids[0] = -1
    y = kern.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, wts, mode=mode)
    exp = ref.multi_lora_linear(x.float(), w.float(), b.float(), a.float(), bb.float(), s, ids, ranks, wts)
    base = F.linear(x, w, b)
    lora = (exp - base.float()).abs().max().item()
    err = (y.float() - exp).abs().max().item()
    none = (ids < 0).all(1)
    base_rows_equal = bool(torch.equal(y[none], base[none]))
    # y is rounded to bf16 twice (cuBLAS base, then base + LoRA): up to 2 ulp = 2^-6 relative;
    # U is rounded to bf16 before the expand MMA: ~1% of the LoRA term. A wrong adapter, slot or
    # rank tile gives errors of the LoRA term's size.
    tol = 2.0**-6 * exp.abs().max().item() + 0.01 * lora
    row = dict(case=f"T={t} {k_in}->{n} L={num} r<={r_max} k={slots} {mode}", T=t, in_features=k_in,
               out_features=n, adapters=num, r_max=r_max, slots=slots, ranks=list(rank_choices), mode=mode,
               max_abs_err=err, tol=tol, lora_term_max=lora, base_rows_bit_equal=base_rows_equal,
               ok=bool(err <= tol and base_rows_equal))
    print(row, flush=True)
    return [row]


def graph_decode(torch, dev, dt, g, shape) -> tuple[dict, dict]:
    """One decode step captured in a CUDA graph replays to the eager result; times graph vs the base's graph."""
    import torch.nn.functional as F

    from lora_triton.ops.multi_lora import multi_lora_linear

    x, w, b, a, bb, s, ids, ranks, _ = _setup(torch, dev, dt, g, *shape)
    eager = multi_lora_linear(x, w, b, a, bb, s, ids, ranks, validate=False)
    if dev.type != "cuda":  # --self-test: the eager op only
        return dict(case="cuda graph decode", captured=False, ok=bool(torch.isfinite(eager).all())), {}
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
        base_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(base_graph):
            F.linear(x, w, b)
        timings = {"decode_T16_graph_us": common.bench_ms(graph.replay, dev) * 1e3,
                   "decode_T16_base_graph_us": common.bench_ms(base_graph.replay, dev) * 1e3}
        return dict(case="cuda graph decode", captured=True, ok=bool(torch.equal(out, eager))), timings
    except Exception as exc:  # report, do not hide
        return dict(case="cuda graph decode", captured=False, ok=False, error=repr(exc)[:500]), {}


def distinct_adapters(torch, dev, dt, g, shape) -> dict:
    """T tokens on T distinct adapters, LoRA term only: the adapter bytes dominate what moves."""
    from lora_triton.kernels import multi_lora as kern

    x, _, _, a, bb, s, _, ranks, _ = _setup(torch, dev, dt, g, *shape)
    t, n = shape[0], shape[2]
    ids = torch.randperm(t, device=dev).reshape(t, 1)
    us = common.bench_ms(lambda: kern.multi_lora_linear(x, None, None, a, bb, s, ids, ranks), dev) * 1e3
    moved = (a.numel() + bb.numel() + x.numel() + 2 * t * n) * x.element_size()
    return {f"distinct{t}_lora_only_us": us, f"distinct{t}_TBps": moved / us / 1e6}


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    torch, dev = common.setup(args, "device_check_serving")
    deadline = common.Deadline(args.budget)
    dt = torch.float16 if args.self_test else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [c for c in (SELF_TEST if args.self_test else CASES) if c[-1] or not args.quick]
    rows = common.run_cases(cases, lambda c: check_case(c, torch, dev, dt, g), deadline,
                            label=lambda c: f"T={c[0]} {c[1]}->{c[2]} L={c[3]} {c[7]}")
    timings = {}
    if not deadline.passed(reserve=10):
        graph_row, timings = graph_decode(torch, dev, dt, g, SELF_TEST_DECODE if args.self_test else DECODE)
        rows.append(graph_row)
        timings.update(distinct_adapters(torch, dev, dt, g, SELF_TEST_DISTINCT if args.self_test else DISTINCT))
    else:
        rows.append(dict(case="cuda graph decode + timings", output="(skipped: step budget spent)", ok=None))
    print({"timings": timings, "cuda_graph": rows[-1]}, flush=True)
    rc = common.verdict(rows, deadline)
    common.write_json(args.out, "device_check_serving.json", dict(common.metadata(torch, dev, args), ok=rc == 0,
                                                                  seconds=deadline.elapsed(), cases=rows,
                                                                  timings=timings))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
