"""Adapter kinds and layer types side by side with PEFT: LoHa, LoKr (Linear), Conv2d LoRA, Embedding LoRA.

    python -m lora_triton.benchmark.kinds_bench [--widths 1024,4096] [--repeats 5] [--json out.json]
    python -m lora_triton.benchmark.kinds_bench --device cuda --quick [--json out.json]   # bf16 on the GPU

Each case times, interleaved in one process, a training step (forward + backward through
``torch.autograd.grad``; x and the adapter require grad, the base is frozen) of the frozen base layer
alone (``base``), our layer (``lora_triton``) and PEFT's (``peft``), all with the same base and adapter
values, and counts the bytes each saves for backward beyond its inputs and parameters
(``timing.saved_tensor_bytes``). Ratios are to ``base``. CPU timings on a shared machine are noisy: the
load average is recorded with the results. ``--device cuda`` runs the same cases in bf16 (base and
inputs; adapters fp32 as both libraries keep them) with CUDA-event timing and more tokens per Linear
case (``CUDA_TOKENS``); ``--quick`` keeps the 1024-wide Linears only and trims repeats and warmup so
the whole run fits a short device check (the first calls, in the warmup, include Triton's compile of
the fused ``lora_linear`` kernels the LoHa Linear cases use).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .cases import select_cases
from .report import write_json
from .stats import summarize
from .timing import measure_interleaved, saved_tensor_bytes


@dataclass
class KindCase:
    name: str
    build_base: object  # () -> nn.Module
    make_input: object  # (generator) -> tensor
    our_config: object
    peft_config: object
    shape: str


class _Holder(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


CUDA_TOKENS = {1024: 8192, 4096: 4096}


def _pair(case: KindCase, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    """(base, ours, peft) layers holding the same weights, the base in ``dtype`` on ``device``."""
    import peft

    import lora_triton as lt

    torch.manual_seed(0)
    base = case.build_base().to(device, dtype).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_Holder(copy.deepcopy(base)), case.peft_config).base_model.model.m
    ours = lt.inject_lora(_Holder(copy.deepcopy(base)), case.our_config).m
    theirs_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs_params[n])
    return base, ours, theirs


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params

    def call(_i):
        y = layer(x)
        if inputs:  # the frozen embedding alone has nothing to differentiate
            torch.autograd.grad(y, inputs, dy)
    return call


def run_case(case: KindCase, repeats: int, warmup: int, device: torch.device = torch.device("cpu"),
             dtype: torch.dtype = torch.float32) -> dict:
    base, ours, theirs = _pair(case, device, dtype)
    g = torch.Generator().manual_seed(1)
    x = case.make_input(g)
    if x.is_floating_point():  # ids stay integer; activations take the base's dtype and require grad
        x = x.to(device, dtype).requires_grad_(True)
    else:
        x = x.to(device)
    with torch.no_grad():
        dy = torch.randn(base(x).shape, generator=g).to(device, dtype)
    layers = {"base": base, "lora_triton": ours, "peft": theirs}
    for layer in layers.values():
        layer.train()
    with torch.no_grad():
        out = {n: layer(x) for n, layer in layers.items() if n != "base"}
    fns = {n: _step(layer, x, dy) for n, layer in layers.items()}
    samples = measure_interleaved(fns, device, repeats, warmup)
    median = {n: summarize(s).median_s for n, s in samples.items()}
    saved = {n: saved_tensor_bytes(fns[n], 0, [x, *layers[n].parameters()]) for n in fns}
    diff = (out["lora_triton"].float() - out["peft"].float()).abs().max().item()
    return {"case": case.name, "shape": case.shape, "median_s": median,
            "ratio_to_base": {n: median[n] / median["base"] for n in median},
            "saved_bytes": saved, "max_abs_diff_vs_peft": diff}


def default_cases(widths=(1024, 4096), tokens: dict | None = None) -> list[KindCase]:
    import peft

    import lora_triton as lt

    tokens = tokens or {1024: 2048, 4096: 512}
    cases = []
    for w in widths:
        m = tokens.get(w, 512)

        def lin(w=w):
            return nn.Linear(w, w)

        def inp(g, w=w, m=m):
            return torch.randn(m, w, generator=g)

        shape = f"Linear {w}x{w}, x [{m}, {w}], r=8"
        cases.append(KindCase(f"loha-linear-{w}", lin, inp, lt.LoHaConfig(target_modules=["m"], r=8),
                              peft.LoHaConfig(target_modules=["m"], r=8, init_weights=False), shape))
        cases.append(KindCase(f"lokr-linear-{w}", lin, inp, lt.LoKrConfig(target_modules=["m"], r=8),
                              peft.LoKrConfig(target_modules=["m"], r=8, init_weights=False), shape))
    cases.append(KindCase(
        "lora-conv2d", lambda: nn.Conv2d(128, 128, 3, padding=1),
        lambda g: torch.randn(4, 128, 32, 32, generator=g),
        lt.LoraConfig(target_modules=["m"], r=16), peft.LoraConfig(target_modules=["m"], r=16, init_lora_weights=False),
        "Conv2d 128->128 3x3, x [4, 128, 32, 32], r=16"))
    for effective in (False, True):
        cases.append(KindCase(
            f"loha-conv2d{'-effective' if effective else ''}", lambda: nn.Conv2d(320, 320, 3, padding=1),
            lambda g: torch.randn(2, 320, 32, 32, generator=g),
            lt.LoHaConfig(target_modules=["m"], r=4, use_effective_conv2d=effective),
            peft.LoHaConfig(target_modules=["m"], r=4, use_effective_conv2d=effective, init_weights=False),
            f"Conv2d 320->320 3x3, x [2, 320, 32, 32], r=4{', effective conv (Tucker)' if effective else ''}"))
    cases.append(KindCase(
        "lora-embedding", lambda: nn.Embedding(32000, 1024),
        lambda g: torch.randint(0, 32000, (8, 512), generator=g),
        lt.LoraConfig(target_modules=["m"], r=16), peft.LoraConfig(target_modules=["m"], r=16, init_lora_weights=False),
        "Embedding 32000x1024, ids [8, 512], r=16"))
    return cases


def format_table(results: list[dict]) -> str:
    lines = ["| case | shape | lora_triton / base | PEFT / base | PEFT / lora_triton | saved MiB ours | "
             "saved MiB PEFT |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t, s = r["ratio_to_base"], r["saved_bytes"]
        lines.append(f"| {r['case']} | {r['shape']} | {t['lora_triton']:.2f}x | {t['peft']:.2f}x | "
                     f"{r['median_s']['peft'] / r['median_s']['lora_triton']:.2f}x | "
                     f"{s['lora_triton'] / 2**20:.2f} | {s['peft'] / 2**20:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_triton.benchmark.kinds_bench", description=__doc__.split("\n")[0])
    p.add_argument("--widths", default=None, help="Linear widths (default 1024,4096; 1024 with --quick)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on cpu, "
                                                 "bfloat16 on cuda)")
    p.add_argument("--quick", action="store_true",
                   help="1024-wide Linears only, 3 warmup rounds, 10 repeats (a short device check)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (cpu), 30 (cuda), 10 with --quick")
    p.add_argument("--warmup", type=int, default=None, help="default 1 (cpu), 3 (cuda)")
    p.add_argument("--only", default=None, help="comma-separated case names or substrings of names; "
                   "one that matches nothing is an error")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 on a loaded machine: spinning thread pools distort small ops)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (10 if args.quick else 30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    widths = args.widths or ("1024" if args.quick else "1024,4096")
    cases = default_cases(tuple(int(w) for w in widths.split(",")), CUDA_TOKENS if cuda else None)
    cases = select_cases(cases, args.only)
    load_start = list(os.getloadavg())
    results = []
    for case in cases:
        results.append(run_case(case, repeats, warmup, device, dtype))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=dtype_name,
                threads=torch.get_num_threads(), repeats=repeats, load_average_start=load_start,
                loadavg=list(os.getloadavg()), torch=torch.__version__)
    print(format_table(results))
    print(", ".join(f"{k} {v}" for k, v in meta.items()))
    if args.json_path:
        write_json({**meta, "results": results}, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
