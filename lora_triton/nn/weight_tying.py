"""``LoraConfig(ensure_weight_tying=True)``: PEFT 0.21.2's tied adapters on a tied embedding and output head.

When a model's output head shares its weight with the input embedding (transformers' tied word
embeddings) and the config targets the embedding (PEFT's test: a ``target_modules`` entry whose last
name is ``embed_tokens`` or ``lm_head``), PEFT adds the input embedding to ``target_modules``, takes the
tied heads out of it, and wraps each head with a LoRA whose factors are the embedding adapter's,
transposed: head ``lora_A`` = ``lora_embedding_B``^T, head ``lora_B`` = ``lora_embedding_A``^T. So the
head's delta s B A equals the embedding's (s (B_e A_e)^T) and the merged weights stay one table.

As in PEFT the head's factors are separate ``nn.Parameter`` objects over the embedding's storage (views,
no copy): each gets its own gradient and an optimizer step on either moves both; the head's init runs
last and writes into that shared storage (default init: the embedding's B becomes kaiming-uniform
values, its A zero). Files carry both key sets, equal. Merging folds the shared delta into the one table
once (the head's ``delta_weight`` is zero: ``LoraLinear.tied_adapters``); PEFT 0.21.2 folds it twice, so
its merged model differs from its unmerged one. Not covered (a clear error): the
``modules_to_save`` route (an embedding in modules_to_save with ensure_weight_tying).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional

from torch import nn

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for "the embedding is targeted"


def _unwrapped(m: nn.Module) -> nn.Module:
    return getattr(m, "base_layer", m)


def _input_embedding(model: nn.Module):
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None, None
    path = next((p for p, m in model.named_modules() if m is emb or _unwrapped(m) is emb), None)
    return path, emb


def _tied(model: nn.Module) -> tuple[Optional[str], list[str]]:
    """(the input embedding's path, the paths of the Linear modules whose weight is the embedding's); no heads
    when the model's config sets tie_word_embeddings=False (as PEFT) or it has no input embedding."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return None, []
    emb_path, emb = _input_embedding(model)
    if emb is None:
        return None, []
    weight = _unwrapped(emb).weight
    return emb_path, [p for p, m in model.named_modules()
                      if p and p != emb_path and isinstance(_unwrapped(m), nn.Linear) and _unwrapped(m).weight is weight
                      and not p.endswith(".base_layer")]


def _embedding_targeted(config) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES)
    return any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in targets or [])


def resolve(model: nn.Module, config):
    """PEFT's ``_add_targets_to_tie``: the config with the input embedding added to target_modules and the
    tied heads taken out (unchanged when ensure_weight_tying is off or nothing is tied / targeted)."""
    if not getattr(config, "ensure_weight_tying", False):
        return config
    emb_path, heads = _tied(model)
    if not heads:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=3)
        return config
    if any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in config.modules_to_save or []):
        raise NotImplementedError("ensure_weight_tying=True with the embedding in modules_to_save is not supported "
                                  "by lora_triton; target the embedding with LoRA instead")
    if not _embedding_targeted(config):
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`", stacklevel=3)
        return config
    targets = config.target_modules
    if isinstance(targets, str):
        return dataclasses.replace(config, target_modules=rf"(?:{targets}|^{re.escape(emb_path)}$)")
    kept = list(dict.fromkeys([*targets, emb_path]))
    for head in heads:  # the first entry naming each head, as PEFT removes it
        hit = next((m for m in kept if re.match(rf"(^|.*\.){m}($|\..*)", head)), None)
        if hit is not None:
            kept.remove(hit)
    return dataclasses.replace(config, target_modules=kept)


def tied_targets(model: nn.Module, config) -> list[str]:
    """The heads to wrap with tied adapters (after ``resolve``): empty unless the input embedding is a target."""
    return _tied_targets(model, config)[1]


def _tied_targets(model: nn.Module, config) -> tuple[Optional[str], list[str]]:
    """(the input embedding's path, ``tied_targets``)."""
    if not getattr(config, "ensure_weight_tying", False):
        return None, []
    from .targets import is_target

    emb_path, heads = _tied(model)
    if emb_path is None or not is_target(config, emb_path):
        return emb_path, []
    return emb_path, heads


def tie_adapters(model: nn.Module, config, adapter_name: str) -> None:
    """Point each tied head's new adapter at the embedding adapter's factors (transposed views), then run the
    head's init on them (PEFT's order)."""
    emb_path, heads = _tied_targets(model, config)
    if not heads:
        return
    emb = model.get_submodule(emb_path)
    for path in heads:
        head = model.get_submodule(path)
        a_e, b_e = emb.lora_embedding_A[adapter_name], emb.lora_embedding_B[adapter_name]
        if head.r[adapter_name] != a_e.shape[0]:
            raise ValueError(f"ensure_weight_tying: {path} has r={head.r[adapter_name]} but the tied embedding "
                             f"{emb_path} has r={a_e.shape[0]}; give them one rank")
        head.lora_A[adapter_name].weight = nn.Parameter(b_e.t(), requires_grad=b_e.requires_grad)
        head.lora_B[adapter_name].weight = nn.Parameter(a_e.t(), requires_grad=a_e.requires_grad)
        head.reset_adapter(adapter_name, config.init_lora_weights)
        head.tied_adapters = getattr(head, "tied_adapters", set()) | {adapter_name}  # merged once, by the embedding
