"""A whole training step of a small Llama with LoRA on every linear layer: lora_triton vs PEFT vs the
frozen model, interleaved in one process (the per-call fixed cost of the op shows here, not in the
single-layer suites).

    python -m lora_triton.benchmark.tiny_llama [--hidden 256] [--layers 2] [--tokens 64] [--dropout 0.05]
                                               [--repeats 30] [--threads N] [--custom-op] [--cpu-time]
                                               [--layer] [--json out.json]

Step = forward, cross-entropy loss, backward (no optimizer). Same weights and inputs for every
provider; PEFT's model is a deep copy wrapped by ``get_peft_model``. ``--custom-op`` adds the
provider ``lora_triton_custom_op``: the same model with ``LORA_TRITON_EAGER=0``, every call through
the torch.library custom ops (what the eager fast path of ``ops/eager.py`` saves). ``--cpu-time``
times the calling thread's CPU time (``time.thread_time``: descheduling does not count) instead of
wall time; it measures the whole step only with ``--threads 1``. Besides each provider's median over PEFT's, it
prints the per-round ratios to PEFT (median and quartiles; ``paired_ratios``). ``--layer`` times one linear layer
instead (x [tokens, hidden] -> [tokens, hidden], fwd + bwd to x and the adapter): the per-call cost.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch

from .stats import percentile, summarize
from .timing import measure_interleaved


def build(hidden: int, layers: int, r: int, dropout: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return _providers(base, targets, r, dropout)


def _providers(base, targets: list[str], r: int, dropout: float) -> dict:
    """The frozen ``base`` and deep copies of it with our LoRA and (when installed) PEFT's on ``targets``,
    all in train mode (dropout on)."""
    import lora_triton as lt

    ours = copy.deepcopy(base)
    lt.inject_lora(ours, lt.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))
    models = {"lora_triton": ours, "base": base}
    try:
        from peft import LoraConfig, get_peft_model

        models["peft"] = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))
    except ImportError:
        pass
    for m in models.values():
        m.train()  # dropout on
    return models


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """``name`` set to ``value`` for the block (None: left as it is), restored after."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def build_layer(hidden: int, r: int, dropout: float):
    """One Linear(hidden, hidden): LoRA-injected, PEFT-wrapped (``lora.Linear``) and frozen."""
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.lin = torch.nn.Linear(hidden, hidden)
    base.lin.requires_grad_(False)
    return _providers(base, ["lin"], r, dropout)


def layer_step_fn(model, x, dy, eager: str | None = None):
    """Forward and backward of one layer to x and its trainable parameters."""
    leaves = [x] + [p for p in model.parameters() if p.requires_grad]

    def step(_i):
        with _env("LORA_TRITON_EAGER", eager):
            torch.autograd.grad(model(x), leaves, dy)
    return step


def step_fn(model, ids, eager: str | None = None):
    """One training step; ``eager`` sets ``LORA_TRITON_EAGER`` for its duration (None leaves it)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(_i):
        with _env("LORA_TRITON_EAGER", eager):
            out = model(input_ids=ids, labels=ids)
            torch.autograd.grad(out.loss, params)
    return step


def paired_ratios(times: list[float], peft: list[float]) -> tuple[float, float, float]:
    """(median, p25, p75) of time / PEFT's time in the same interleaved round: load that comes and goes hits
    both samples of a round alike, so these spread less than the ratio of the two medians. Percentiles as
    ``summarize``'s (``stats.percentile``, linear), so "median" means the same on both halves of a line."""
    r = [a / b for a, b in zip(times, peft)]
    return percentile(r, 50.0), percentile(r, 25.0), percentile(r, 75.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_triton.benchmark.tiny_llama", description=__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--custom-op", action="store_true", help="add lora_triton through its torch.library custom ops")
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time (with --threads 1)")
    ap.add_argument("--layer", action="store_true", help="one hidden x hidden linear layer instead of the model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    if args.layer:
        models = build_layer(args.hidden, args.rank, args.dropout)
        x = torch.randn(args.tokens, args.hidden, requires_grad=True)
        dy = torch.randn(args.tokens, args.hidden)
        fns = {name: layer_step_fn(m, x, dy) for name, m in models.items()}
        if args.custom_op:
            fns["lora_triton_custom_op"] = layer_step_fn(models["lora_triton"], x, dy, eager="0")
    else:
        models = build(args.hidden, args.layers, args.rank, args.dropout)
        ids = torch.randint(0, 512, (1, args.tokens))
        # The frozen model's step backpropagates to its embeddings: the same activation backward, no LoRA.
        models["base"].model.embed_tokens.weight.requires_grad_(True)
        fns = {name: step_fn(m, ids) for name, m in models.items()}
        if args.custom_op:
            fns["lora_triton_custom_op"] = step_fn(models["lora_triton"], ids, eager="0")
    for f in fns.values():
        f(0)
    samples = measure_interleaved(fns, torch.device("cpu"), repeats=args.repeats, warmup=3,
                                  clock=time.thread_time if args.cpu_time else time.perf_counter)
    stats = {k: summarize(v) for k, v in samples.items()}
    paired = {k: paired_ratios(v, samples["peft"]) for k, v in samples.items()} if "peft" in samples else {}
    end = os.getloadavg()
    what = f"one layer {args.hidden} -> {args.hidden}" if args.layer else f"tiny Llama step: hidden {args.hidden}, " \
        f"{args.layers} layers"
    print(f"{what}, {args.tokens} tokens, r={args.rank}, "
          f"lora_dropout={args.dropout}, fp32 cpu, {torch.get_num_threads()} threads, "
          f"{'thread CPU' if args.cpu_time else 'wall'} time; "
          f"load {load[0]:.2f} -> {end[0]:.2f}")
    for k, s in stats.items():
        rel = f"  x peft {s.median_s / stats['peft'].median_s:.3f}" if "peft" in stats else ""
        if k in paired and k != "peft":
            rel += " (per round: median {:.3f}, p25..p75 {:.3f}..{:.3f})".format(*paired[k])
        print(f"  {k:22s} median {s.median_s * 1e3:8.3f} ms  p20..p80 {s.p20_s * 1e3:.3f}..{s.p80_s * 1e3:.3f}{rel}")
    if args.json:
        doc = {"args": vars(args), "load_average": list(load), "load_average_end": list(end),
               "threads": torch.get_num_threads(), "stats": {k: s.to_dict() for k, s in stats.items()},
               "paired_x_peft": {k: dict(zip(("median", "p25", "p75"), v)) for k, v in paired.items()}}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
