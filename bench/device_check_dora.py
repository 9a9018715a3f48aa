"""GPU check, DoRA part (issue 10): bf16 / fp16 correctness of every DoRA kernel, then DoRA vs our LoRA timing.

Every kernel of kernels/dora.py (row norm, factored norm, shrink, fused forward, dU/dB/dm, dA, dgrad; p = 0
and p > 0) against the PyTorch twin in the same precision and fp32 on real layer shapes, outputs NaN-poisoned
before the kernels write them; then the issue's GPU goal, DoRA fwd+bwd vs our LoRA fwd+bwd at M = 8192,
K = N = 4096, r = 16, bf16 (goal <= 1.15x; reported, not judged). Writes DIR/dora.json; exit 1 on a failed
check. Default kernel configs (no autotuning) keep it short: mostly Triton compiles.

    python bench/device_check_dora.py [--quick] [--out DIR] [--budget S]   # --quick: 3 cases, p = 0 timing
    python bench/device_check_dora.py --self-test --out DIR                # CPU, Triton's interpreter

Criterion per output (the team's 2x rule): max|kernel - fp32| <= 2 max|reference - fp32| + atol (1 + max|fp32|).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _device_common as dc  # noqa: E402

# (label, M, K, N, r, p, transposed weight, bias, dtype)
CASES = [
    ("llama-8b q_proj", 8192, 4096, 4096, 16, 0.1, False, False, "bfloat16"),
    ("llama-8b up_proj r64", 2048, 4096, 14336, 64, 0.0, False, False, "bfloat16"),
    ("gpt2 c_attn Conv1D odd", 37, 768, 2304, 3, 0.1, True, True, "bfloat16"),
    ("odd sizes, M=1, r=1", 1, 1000, 3000, 1, 0.0, False, True, "bfloat16"),
    ("fp16 q_proj", 2048, 4096, 4096, 16, 0.1, False, True, "float16"),
]
QUICK = ("llama-8b q_proj", "gpt2 c_attn Conv1D odd", "odd sizes, M=1, r=1")
SELF_TEST = [("small", 19, 40, 33, 3, 0.3, False, True, "float16"),
             ("small T", 1, 24, 20, 1, 0.0, True, True, "float32")]
ATOL = 2e-3


def _operands(m, k, n, r, transposed, has_bias, dt, dev, torch):
    g = torch.Generator(device=dev).manual_seed(m * 7 + k)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
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
    return [dc.check(label, name, got[name], same[name], truth[name].double(), ATOL) for name in got]


def time_goal(torch, dev, ps, m=8192, k=4096, n=4096, r=16, dtype="bfloat16") -> dict:
    """Median ms of one DoRA and one LoRA training step (fwd + bwd through the ops), bf16; the norm is
    recomputed every DoRA step, as after an optimizer step."""
    from lora_triton.ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
    from lora_triton.ops.lora_linear import lora_linear

    dt = getattr(torch, dtype)
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

        def dora_step(p=p):
            norm = dora_weight_norm(w, a, b, 2.0, sq)
            return torch.autograd.grad(dora_linear(x, w, None, a, b, mag, 2.0, p, weight_norm=norm), [x, a, b, mag],
                                       dy)

        def composed_step():
            # p = 0 only: DoRA from LoRA's own (TMA / persistent) kernels plus elementwise ops, y = g (x W^T + s U B^T):
            # what the fused DoRA kernels must beat; autograd gives dm = sum_t dy y_pre / n and g dy.
            g = (mag / dora_weight_norm(w, a, b, 2.0, sq)).to(dt)
            return torch.autograd.grad(lora_linear(x, w, None, a, b, 2.0, 0.0) * g, [x, a, b, mag], dy)

        lora_ms, dora_ms = dc.bench_ms(lora_step, dev), dc.bench_ms(dora_step, dev)
        out[f"p={p:g}"] = dict(lora_ms=lora_ms, dora_ms=dora_ms, ratio=dora_ms / lora_ms, goal=1.15)
        if p == 0.0:
            out["p=0"]["composed_on_lora_ms"] = composed = dc.bench_ms(composed_step, dev)
            out["p=0"]["composed_ratio"] = composed / lora_ms
    return out


def main(argv=None) -> int:
    args = dc.parser(__doc__).parse_args(argv)
    torch, dev = dc.setup(args, "device_check_dora")
    from lora_triton.kernels import dora as kern
    from lora_triton.reference import dora as ref

    dc.poison_empty(kern)
    deadline = dc.Deadline(args.budget)
    cases = SELF_TEST if args.self_test else [c for c in CASES if not args.quick or c[0] in QUICK]
    rows = dc.run_cases(cases, lambda case: check_case(case, kern, ref, torch, dev), deadline)
    for row in rows:
        if "kernel_err" in row:
            print(f"{row['case']:<26} {row['output']:<6} err {row['kernel_err']:.3g}  ref {row['reference_err']:.3g}"
                  f"  bound {row['bound']:.3g}  {'ok' if row['ok'] else 'FAIL'}")
    timing = None
    if not deadline.passed(reserve=10):  # the timing needs a few seconds of compiles and runs
        m, k, dt = (32, 32, "float32") if args.self_test else (8192, 4096, "bfloat16")  # self-test: no bf16
        timing = time_goal(torch, dev, (0.0,) if args.quick or args.self_test else (0.0, 0.1), m=m, k=k, n=k,
                           dtype=dt)
        for key, t in timing.items():
            print(f"M={m} K=N={k} r=16 {dt} {key}: lora {t['lora_ms']:.3f} ms, dora {t['dora_ms']:.3f} ms, "
                  f"dora/lora {t['ratio']:.3f} (goal <= {t['goal']})"
                  + (f"; composed on LoRA's kernels {t['composed_ratio']:.3f}" if "composed_ratio" in t else ""))
    doc = dict(dc.metadata(torch, dev, args), elapsed_s=deadline.elapsed(), rows=rows, timing=timing)
    dc.write_json(args.out, "dora.json", doc)
    return dc.verdict(rows, deadline)


if __name__ == "__main__":
    raise SystemExit(main())
