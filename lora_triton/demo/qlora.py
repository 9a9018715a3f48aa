"""``lora-triton demo --qlora``: the same demo over a 4-bit NF4 base, then a PEFT + bitsandbytes check.

The encoder's Linear layers are quantized with ``lora_triton.quantize`` (the classifier head stays in
full precision: it is the adapters' modules_to_save). After the usual steps, the first adapter is
loaded into PEFT over bitsandbytes ``Linear4bit`` layers built from our 4-bit state dict (transformers'
bnb-4bit layout) and its logits are compared with ours, where bitsandbytes and peft are installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings

import torch
from torch import nn

from ..nn.nf4_linear import NF4Linear
from ..nn.quantize import quantize
from .models import BaseModel

QLORA_TARGETS = r"bert\..*"  # every Linear of the encoder and pooler; not the classifier head
PEFT_TOL = 1e-4


def quantized(base: BaseModel) -> BaseModel:
    def build():
        return quantize(base.build(), target_modules=QLORA_TARGETS)

    return dataclasses.replace(base, build=build, description=base.description + ", encoder in NF4 (QLoRA)")


def _bnb_copy(model: nn.Module) -> nn.Module:
    """``model`` with each NF4Linear replaced by a bitsandbytes Linear4bit loaded from its state dict."""
    import bitsandbytes as bnb

    for path, layer in list(model.named_modules()):
        if not isinstance(layer, NF4Linear):
            continue
        sd = layer.state_dict()
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              quant_type=layer.quant_type, compress_statistics=layer.double_quant,
                              compute_dtype=layer.compute_dtype)
        stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
        q.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=q)
        if layer.bias is not None:
            q.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, q)
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit load; PEFT dispatches on it
    return model


def step_peft_bnb(ctx) -> None:
    missing = [m for m in ("bitsandbytes", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        ctx.log(f"\nPEFT + bitsandbytes check skipped ({', '.join(missing)} not installed)")
        return
    import peft

    name = next(iter(ctx.tasks))
    model = _bnb_copy(ctx.base.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(model, os.path.join(ctx.out_dir, name)).eval()
    # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks the weight and computes in bf16 when its input needs
    # no grad in eval mode; an embedding that requires grad keeps it on its fp32 path.
    peft_model.get_input_embeddings().weight.requires_grad_(True)
    enc = ctx.encoded[name]["eval"]
    with torch.enable_grad():
        logits = torch.cat([peft_model(**{k: v[i:i + 64] for k, v in enc.items()}).logits.detach()
                            for i in range(0, enc["input_ids"].shape[0], 64)]).float()
    diff = (logits - ctx.eval_logits[name]).abs().max().item()
    ok = diff < PEFT_TOL
    ctx.log(f"\nloaded {name!r} into PEFT over bitsandbytes Linear4bit (built from our 4-bit state dict): "
            f"max |logits diff| vs lora_triton {diff:.2e} ({'ok' if ok else 'MISMATCH'})")
    ctx.notes.append(f"PEFT + bitsandbytes 4-bit model with our {name!r} adapter: max |logits diff| {diff:.1e}")
    if not ok:
        ctx.failures.append(f"PEFT + bitsandbytes differs from lora_triton by {diff:.3g} (tolerance {PEFT_TOL:g})")


STEPS = [("peft_bnb", step_peft_bnb)]
