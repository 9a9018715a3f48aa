"""``lora-triton bench-peft``: a PEFT training step, plain vs ``patch_peft``, interleaved in one process.

Cases: a tiny Llama (hidden 64, 2 layers, every projection targeted; a whole AdamW step) and one
PEFT LoRA Linear of width 4096 (fwd+bwd, p=0 and p=0.1). Prints a table; ``--json`` writes the numbers
with shape, dtype, device, date and load average. Needs transformers and peft.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import warnings

import torch

from .timing import measure_interleaved

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _step_fn(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(_i):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def tiny_llama_case(device, dtype, tokens: int, dropout: float):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=tokens)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                          target_modules=LLAMA_TARGETS))
    patched = copy.deepcopy(plain)
    _patch(patched)
    ids = torch.randint(0, 128, (4, tokens // 4), device=device)
    batch = {"input_ids": ids, "labels": ids}
    shape = f"tiny Llama h64 L2, batch 4 x {tokens // 4} tokens, r=16, p={dropout}, AdamW step"
    return shape, {"peft": _step_fn(plain, batch), "peft+patch_peft": _step_fn(patched, batch)}


def wide_layer_case(device, dtype, tokens: int, dropout: float, width: int = 4096):
    import peft
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(width, width, device=device, dtype=dtype).requires_grad_(False)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout)
    plain = PeftLinear(base, "default", config=cfg, r=16, lora_alpha=32, lora_dropout=dropout).to(device)
    with torch.no_grad():
        plain.lora_B["default"].weight.normal_(0, 0.01)
    patched = copy.deepcopy(plain)
    _patch(patched)
    plain.train()
    patched.train()
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, width, device=device, dtype=dtype)

    def fwd_bwd(layer):
        def run(_i):
            x.grad = None
            layer(x).backward(dy)
        return run

    shape = f"PEFT Linear {width}x{width}, {tokens} tokens, r=16, p={dropout}, fwd+bwd (dx, dA, dB)"
    return shape, {"peft": fwd_bwd(plain), "peft+patch_peft": fwd_bwd(patched)}


def _patch(model):
    from ..nn.peft_patch import patch_peft

    summary = patch_peft(model)
    if summary.unsupported or not summary.patched:
        raise RuntimeError(f"benchmark model not fully patched: {summary}")


def run(device: str, dtype_name: str, repeats: int, warmup: int, llama_tokens: int, layer_tokens: int):
    device_t, dtype = torch.device(device), getattr(torch, dtype_name)
    cases = [(tiny_llama_case, llama_tokens, p) for p in (0.0, 0.1)] + \
        [(wide_layer_case, layer_tokens, p) for p in (0.0, 0.1)]
    rows = []
    for build, tokens, p in cases:
        shape, fns = build(device_t, dtype, tokens, p)
        times = measure_interleaved(fns, device_t, repeats=repeats, warmup=warmup)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append({"case": shape, "median_s": med, "samples_s": times,
                     "speedup": med["peft"] / med["peft+patch_peft"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lora-triton bench-peft", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--llama-tokens", type=int, default=256, help="tokens per tiny-Llama step (batch of 4)")
    p.add_argument("--layer-tokens", type=int, default=None, help="tokens for the 4096 layer (CPU 512, CUDA 8192)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lora-triton bench-peft: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    layer_tokens = args.layer_tokens or (8192 if args.device == "cuda" else 512)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows = run(args.device, dtype, args.repeats, args.warmup, args.llama_tokens, layer_tokens)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "dtype": dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_average_start": load_start,
           "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "rows": rows}
    print(f"{doc['date']}  device={doc['device']}  dtype={dtype}  threads={doc['threads']}  "
          f"load {load_start} -> {doc['load_average_end']}")
    print(f"{'case':<82} {'peft ms':>10} {'patched ms':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<82} {r['median_s']['peft'] * 1e3:>10.2f} {r['median_s']['peft+patch_peft'] * 1e3:>11.2f} "
              f"{r['speedup']:>7.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
