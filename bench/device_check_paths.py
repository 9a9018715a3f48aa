"""GPU check, path part (issue 12's goals): the fused and the composed training paths against the frozen base on
cuBLAS and PEFT's layer, bf16, at the issue-12 shapes, and which path ``LORA_TRITON_PATH=auto`` picks on this
GPU. Prints a table, writes OUT/paths.json; exit 1 when a shape fails.

    python bench/device_check_paths.py [--quick] [--out DIR] [--budget S] [--autotune] [--self-test]

Shapes: M=8192 with (K, N) = (4096, 4096) and (4096, 14336), r = 16 and 64, p = 0.1 and 0, the headline
(4096, 4096, r=16, p=0.1) first so a short budget still measures it; --quick: the two r=16 shapes at
4096x4096 (with --self-test: one tiny shape). Per shape (triton.testing.do_bench, median ms): base
fwd = x W^T, base fwd+bwd = x W^T + dy W (frozen weight: dgrad only); fused / composed fwd and fwd+bwd
(the kernel launchers called directly); PEFT fwd+bwd (its LoRA Linear under autograd, x requiring
grad). Ratios are over the frozen base. The auto decision is measured in a fresh cache
(OUT/path_cache) and printed with the times it measured. Goals (H200, bf16): fused fwd+bwd <= 1.08x
the base, fwd <= 1.05x, PEFT / fused >= 1.3x, auto never slower than composed. Default configs
(LORA_TRITON_AUTOTUNE=0) unless --autotune; the kernels are the ones device_check_kernels.py compiled
(same shapes), so a cold GPU compiles little here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device_common as common  # noqa: E402

SHAPES = [(8192, 4096, n, r, p) for n in (4096, 14336) for r in (16, 64) for p in (0.1, 0.0)]
QUICK = SHAPES[:2]
SELF_TEST = [(40, 48, 56, 3, 0.1), (33, 48, 40, 16, 0.0)]


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


def measure(shape, torch, dev, dt, cache_dir) -> list[dict]:
    from lora_triton.kernels import composed, path_choice
    from lora_triton.kernels import lora_linear as kern

    m, k, n, r, p = shape
    s = 2.0
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / 64
    a = torch.randn(r, k, device=dev, dtype=dt) / 64
    bb = torch.randn(n, r, device=dev, dtype=dt) / 8
    dy = torch.randn(m, n, device=dev, dtype=dt)
    seed = torch.tensor([11], dtype=torch.int64, device=dev) if p > 0 else None
    bench = lambda fn: common.bench_ms(fn, dev)  # noqa: E731
    fwd_args = (x, w, None, a, bb, s, p, seed)
    _, u = kern.fused_fwd(*fwd_args)
    bwd_args = (dy, x, w, a, bb, u, s, p, seed, True)
    row = dict(case=f"M={m} K={k} N={n} r={r} p={p}", M=m, K=k, N=n, r=r, p=p, dtype=str(dt).removeprefix("torch."))
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
    if dev.type == "cuda":
        table = json.loads(Path(path_choice.cache_file(torch.cuda.get_device_name())).read_text())
        row["auto_measured_us"] = {op: table[path_choice.key(op, x, w, a, bb, p)]["us"] for op in ("fwd", "bwd")}
    for name in ("fused", "composed"):
        row[f"{name}_fwd_x"] = row[f"{name}_fwd_ms"] / row["base_fwd_ms"]
        row[f"{name}_fwd_bwd_x"] = row[f"{name}_fwd_bwd_ms"] / row["base_fwd_bwd_ms"]
    if "peft_fwd_bwd_ms" in row:
        row["peft_fwd_bwd_x"] = row["peft_fwd_bwd_ms"] / row["base_fwd_bwd_ms"]
    row["ok"] = True
    return [row]


def print_table(rows) -> None:
    print(f"\n{'K x N':<11} {'r':>3} {'p':>4} | {'base fwd':>8} {'fused':>6} {'comp':>6} | {'base f+b':>8} "
          f"{'fused':>6} {'comp':>6} {'peft':>6} | auto fwd/bwd   (ratios over the frozen base; ms)")
    for row in rows:
        if "base_fwd_ms" not in row:
            print(f"{row['case']:<21} | {row['output']} {row.get('error', '')}")
            continue
        head = f"{row['K']}x{row['N']:<6} {row['r']:>3} {row['p']:>4}"
        peft = f"{row['peft_fwd_bwd_x']:>6.3f}" if "peft_fwd_bwd_x" in row else f"{'-':>6}"
        print(f"{head} | {row['base_fwd_ms']:>8.3f} {row['fused_fwd_x']:>6.3f} {row['composed_fwd_x']:>6.3f} | "
              f"{row['base_fwd_bwd_ms']:>8.3f} {row['fused_fwd_bwd_x']:>6.3f} {row['composed_fwd_bwd_x']:>6.3f} "
              f"{peft} | {row['auto_fwd']}/{row['auto_bwd']}")


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    torch, dev = common.setup(args, "device_check_paths")
    deadline = common.Deadline(args.budget)
    dt = torch.float32 if args.self_test else torch.bfloat16
    cache_dir = Path(args.out) / "path_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob("paths-*.json"):
        old.unlink()  # a fresh decision, measured here
    shapes = (SELF_TEST[:1] if args.quick else SELF_TEST) if args.self_test else QUICK if args.quick else SHAPES
    rows = common.run_cases(shapes, lambda sh: measure(sh, torch, dev, dt, cache_dir), deadline,
                            label=lambda sh: "M={} K={} N={} r={} p={}".format(*sh))
    print_table(rows)
    rc = common.verdict(rows, deadline, what="shapes")
    common.write_json(args.out, "paths.json", dict(common.metadata(torch, dev, args), ok=rc == 0,
                                                   seconds=deadline.elapsed(), rows=rows))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
