"""X-LoRA benchmark: lora_triton's fused weighted pass vs PEFT's per-expert loop, 3 / 8 / 32 experts.

    python -m lora_triton.benchmark.xlora_bench [--experts 3,8,32] [--tokens 512] [--dim 1024] [--rank 16]
                                                [--repeats 20] [--model | --model-only]
                                                [--model-tokens 16,64] [--threads N] [--json out.json]

Cases (inference, no_grad, fp32, interleaved in one process; see timing.measure_interleaved):
* layer: one Linear dim x dim holding n experts of rank r, x [tokens, dim], the same softmax routing
  weights for all: ours = XLoraModel's layer forward with weighted_pass "concat" (CPU default: two GEMMs)
  and "multi_lora" (one ``multi_lora_linear`` call, dense and top-2), PEFT = ``XLoraLinearLayer.forward``
  (a loop over experts scaling x), and the base layer;
* model (``--model``): a small Llama (hidden 256, 2 layers) with n experts on every linear, the whole
  two-pass X-LoRA forward, ours vs PEFT's (experts named "0".."n-1", which PEFT needs).
Needs peft and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from dataclasses import asdict

import torch
from torch import nn

from .stats import summarize
from .timing import measure_interleaved


def _expert_dirs(model_fn, targets, n: int, rank: int, root: str) -> dict[str, str]:
    import lora_triton

    dirs = {}
    for i in range(n):
        model = lora_triton.inject_lora(model_fn(), lora_triton.LoraConfig(target_modules=targets, r=rank,
                                                                         lora_alpha=2 * rank))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        dirs[str(i)] = os.path.join(root, str(i))
        lora_triton.save_adapter(model, dirs[str(i)])
    return dirs


class _OneLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids=None, inputs_embeds=None, **_):
        return self.proj(inputs_embeds)


def layer_case(n: int, tokens: int, dim: int, rank: int, repeats: int, root: str) -> dict:
    import peft
    from peft.tuners.xlora.layer import XLoraLinearLayer

    import lora_triton

    dirs = _expert_dirs(lambda: _OneLayer(dim), ["proj"], n, rank, root)
    def xlora(weighted_pass, **kw):
        config = lora_triton.XLoraConfig(hidden_size=dim, adapters=dirs, **kw)
        return lora_triton.XLoraModel(_OneLayer(dim), config, weighted_pass=weighted_pass).eval()

    ours, ours_fused, ours_top2 = xlora("concat"), xlora("multi_lora"), xlora("multi_lora", top_k_lora=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_OneLayer(dim), dirs["0"], adapter_name="0")
        for name in list(dirs)[1:]:
            pm.load_adapter(dirs[name], adapter_name=name)
    target = pm.base_model.model.proj
    target.set_adapter(list(dirs))
    owner = type("Owner", (), {"disabled": False})()
    peft_layer = XLoraLinearLayer(owner, target, target.forward, 0,
                                  peft.XLoraConfig(hidden_size=dim, adapters=dirs))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, dim, generator=g)
    scal = torch.softmax(torch.randn(1, tokens, 1, n, generator=g), dim=-1)
    for m in (ours, ours_fused, ours_top2):
        m._scalings = scal
    base = ours.model.proj.base_layer
    fns = {
        "lora_triton": lambda i: ours.model.proj(x),
        "lora_triton_multi_lora": lambda i: ours_fused.model.proj(x),
        "lora_triton_multi_lora_top2": lambda i: ours_top2.model.proj(x),
        "peft": lambda i: peft_layer.forward(x, scalings=scal),
        "base": lambda i: base(x),
    }
    with torch.no_grad():
        got, want = fns["lora_triton"](0), fns["peft"](0)
        err = (got - want).abs().max().item()
        samples = measure_interleaved(fns, torch.device("cpu"), repeats=repeats, warmup=2)
    return {"case": "layer", "experts": n, "tokens": tokens, "dim": dim, "rank": rank, "max_abs_diff_vs_peft": err,
            "seconds": {k: asdict(summarize(v)) for k, v in samples.items()}}


def _llama(hidden: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def model_case(n: int, tokens: int, rank: int, repeats: int, root: str) -> dict:
    import peft

    import lora_triton

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dirs = _expert_dirs(_llama, targets, n, rank, root)
    kw = dict(hidden_size=256, adapters=dirs, xlora_depth=2, xlora_size=64, xlora_dropout_p=0.0)
    ours = lora_triton.XLoraModel(_llama(), lora_triton.XLoraConfig(**kw)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama(), peft.XLoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    theirs = {k.removeprefix("base_model.internal_xlora_classifier."): v for k, v in pm.state_dict().items()
              if "internal_xlora_classifier" in k}
    ours.internal_xlora_classifier.load_state_dict(theirs)
    ids = torch.randint(0, 512, (2, tokens // 2), generator=torch.Generator().manual_seed(2))
    base = _llama()
    fns = {"lora_triton": lambda i: ours(input_ids=ids).logits, "peft": lambda i: pm(input_ids=ids).logits,
           "base": lambda i: base(input_ids=ids).logits}
    with torch.no_grad():
        err = (fns["lora_triton"](0) - fns["peft"](0)).abs().max().item()
        samples = measure_interleaved(fns, torch.device("cpu"), repeats=repeats, warmup=1)
    return {"case": "model", "experts": n, "tokens": tokens, "rank": rank, "max_abs_diff_vs_peft": err,
            "seconds": {k: asdict(summarize(v)) for k, v in samples.items()}}


def _row(rec: dict) -> str:
    med = {k: v["median_s"] for k, v in rec["seconds"].items()}
    parts = [f"{k} {med[k] * 1e3:.2f} ms" for k in med]
    ratio = med["peft"] / med["lora_triton"]
    return f"{rec['case']:5s} n={rec['experts']:2d} tokens={rec['tokens']:3d}  " + "  ".join(parts) + \
        f"  peft/ours {ratio:5.2f}x  |diff| {rec['max_abs_diff_vs_peft']:.1e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_triton.benchmark.xlora_bench", description=__doc__.split("\n")[0])
    p.add_argument("--experts", default="3,8,32")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", action="store_true", help="also time the whole two-pass forward of a small Llama")
    p.add_argument("--model-only", action="store_true", help="only the model case (implies --model)")
    p.add_argument("--model-tokens", default=None,
                   help="comma-separated token counts for the model case (batch 2); default min(tokens, 256)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    load_before = list(os.getloadavg())
    model_tokens = [int(v) for v in args.model_tokens.split(",")] if args.model_tokens else [min(args.tokens, 256)]
    with tempfile.TemporaryDirectory() as root:
        for n in (int(v) for v in args.experts.split(",")):
            if not args.model_only:
                rec = layer_case(n, args.tokens, args.dim, args.rank, args.repeats, os.path.join(root, f"l{n}"))
                records.append(rec)
                print(_row(rec), flush=True)
            if args.model or args.model_only:
                for tokens in model_tokens:
                    rec = model_case(n, tokens, args.rank, max(3, args.repeats // 4),
                                     os.path.join(root, f"m{n}_{tokens}"))
                    records.append(rec)
                    print(_row(rec), flush=True)
    meta = {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average": list(os.getloadavg())}
    print(json.dumps(meta))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
