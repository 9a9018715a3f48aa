"""CPU fp32 DoRA timings behind docs/dora.md's "CPU speed goals" section (2048 tokens, r = 16, x requires grad).

    python bench/dora_cpu_speed.py ratios THREADS REPEATS SIZE...   # frozen / our LoRA / our DoRA / PEFT DoRA
    python bench/dora_cpu_speed.py peft THREADS...                  # PEFT's ratios under the issue's conditions

``ratios``: fwd+bwd of each provider at K = N = SIZE, p = 0 and 0.1, interleaved in one process (medians; timed
by the benchmark harness, ``lora_triton/benchmark/timing.py`` / ``stats.py``),
each as a multiple of the frozen layer's fwd+bwd; the norm is recomputed every step (as after an optimizer
step). ``peft``: PEFT's LoRA / DoRA (p = 0, 0.1) at 1024 against the frozen layer's fwd+bwd and forward-only,
train and eval, at each thread count. Both print the load average.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("LORA_TRITON_BACKEND", "reference")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lora_triton.benchmark.stats import summarize  # noqa: E402
from lora_triton.benchmark.timing import measure_interleaved  # noqa: E402

M, R = 2048, 16


def _medians(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each no-argument callable: the harness's interleaved timer (one warm-up
    round, the starting provider rotated each round) and its median."""
    samples = measure_interleaved({k: (lambda i, f=f: f()) for k, f in fns.items()}, torch.device("cpu"),
                                  repeats=repeats, warmup=1)
    return {k: summarize(v).median_s for k, v in samples.items()}


def _peft_layer(base, r, alpha, p, dora, train=True):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=dora, init_lora_weights=False)
    return PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=p, use_dora=dora,
                      init_lora_weights=False).train(train)


def _ratio_fns(k: int, p: float) -> dict:
    from lora_triton.ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
    from lora_triton.ops.lora_linear import lora_linear

    s = 1.0
    torch.manual_seed(0)
    x, dy = torch.randn(M, k, requires_grad=True), torch.randn(M, k)
    w = torch.randn(k, k) / k**0.5
    a = (torch.randn(R, k) / k**0.5).requires_grad_()
    b = (torch.randn(k, R) * 0.02).requires_grad_()
    mag = ((w + s * b.detach() @ a.detach()).norm(dim=1) * 1.05).requires_grad_()
    sq = dora_weight_sq(w)
    base = nn.Linear(k, k, bias=False)
    base.weight = nn.Parameter(w, requires_grad=False)
    pl = _peft_layer(base, R, R * s, p, True)
    pl.lora_A["default"].weight = nn.Parameter(a.detach().clone())
    pl.lora_B["default"].weight = nn.Parameter(b.detach().clone())
    pl.lora_magnitude_vector["default"].weight = nn.Parameter(mag.detach().clone())
    theirs = [x, pl.lora_A["default"].weight, pl.lora_B["default"].weight, pl.lora_magnitude_vector["default"].weight]

    def dora():
        y = dora_linear(x, w, None, a, b, mag, s, p, weight_norm=dora_weight_norm(w, a, b, s, sq))
        return torch.autograd.grad(y, [x, a, b, mag], dy)

    return {"frozen": lambda: torch.autograd.grad(nn.functional.linear(x, w), [x], dy),
            "lora": lambda: torch.autograd.grad(lora_linear(x, w, None, a, b, s, p), [x, a, b], dy),
            "dora": dora, "peft_dora": lambda: torch.autograd.grad(pl(x), theirs, dy)}


def ratios(threads: int, repeats: int, sizes: list[int]) -> None:
    torch.set_num_threads(threads)
    for k in sizes:
        for p in (0.0, 0.1):
            fns = _ratio_fns(k, p)
            load0 = os.getloadavg()[0]
            med = _medians(fns, repeats)
            f = med["frozen"]
            print(f"K=N={k} p={p}: " + ", ".join(f"{n} {v * 1e3:.0f} ms ({v / f:.3f}x)" for n, v in med.items())
                  + f"; dora/peft {med['dora'] / med['peft_dora']:.3f}, dora/lora {med['dora'] / med['lora']:.3f}; "
                  f"load {load0:.2f}->{os.getloadavg()[0]:.2f}", flush=True)


def _peft_fns(k: int = 1024) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(k, k).requires_grad_(False)
    x, dy = torch.randn(M, k, requires_grad=True), torch.randn(M, k)

    def step(mod):
        return lambda: mod(x).backward(dy)

    def forward(mod):
        def f():
            with torch.no_grad():
                mod(x)
        return f

    return {"frozen fwd (no grad)": forward(base), "frozen fwd+bwd": step(base),
            "peft lora fwd+bwd": step(_peft_layer(base, R, R, 0.0, False)),
            "peft dora p=0 fwd+bwd": step(_peft_layer(base, R, R, 0.0, True)),
            "peft dora p=0.1 fwd+bwd": step(_peft_layer(base, R, R, 0.1, True)),
            "peft dora eval fwd (no grad)": forward(_peft_layer(base, R, R, 0.0, True, train=False))}


def peft_conditions(thread_counts: list[int], repeats: int = 7) -> None:
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load0 = os.getloadavg()[0]
        med = _medians(_peft_fns(), repeats)
        print(f"threads={threads} load {load0:.2f}->{os.getloadavg()[0]:.2f}")
        for name, v in med.items():
            print(f"  {name:<30} {v * 1e3:8.1f} ms  / frozen fwd {v / med['frozen fwd (no grad)']:.2f}  "
                  f"/ frozen fwd+bwd {v / med['frozen fwd+bwd']:.2f}")


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    if argv and argv[0] == "ratios" and len(argv) >= 4:
        ratios(int(argv[1]), int(argv[2]), [int(a) for a in argv[3:]])
    elif argv and argv[0] == "peft" and len(argv) >= 2:
        peft_conditions([int(a) for a in argv[1:]])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
