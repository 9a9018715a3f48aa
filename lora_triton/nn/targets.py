"""Which modules an adapter targets: PEFT's matching rules, reproduced."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from torch import nn

from .. import patterns
from ..config import ALL_LINEAR, LoraConfig
from .adapter_layer import AdapterLayer
from .lora_linear import LoraLinear, is_supported_base
from .modules_to_save import ModulesToSaveWrapper

# Defaults PEFT uses when target_modules is None, for common transformers model types.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}


def candidate_modules(model: nn.Module):
    """(path, module) pairs that may be targeted: not the internals of our own wrappers."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLinear, AdapterLayer, ModulesToSaveWrapper)):
            skip.append(f"{path}.")
        yield path, module


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    indexes = config.layers_to_transform
    if not indexes:
        return True
    match = None
    if not config.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in config.layers_pattern:
            match = patterns.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, "layers_pattern")
            if match is not None:
                break
    return match is not None and int(match.group("idx")) in indexes


def _in_list_or_suffix(key: str, names) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_target(config: LoraConfig, key: str) -> bool:
    excl = config.exclude_modules
    if excl:
        if (patterns.fullmatch(excl, key, "exclude_modules") if isinstance(excl, str)
                else _in_list_or_suffix(key, excl)):
            return False
    if config.modules_to_save and any(patterns.match(rf"(^|.*\.){m}($|\..*)", key, "modules_to_save")
                                      for m in config.modules_to_save):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return patterns.fullmatch(targets, key, "target_modules") is not None
    if key in targets:  # named exactly: PEFT applies no layer filter
        return True
    return any(key.endswith(f".{n}") for n in targets) and _layer_index_ok(config, key)


def output_head_path(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((p for p, m in model.named_modules() if m is head), None)


def resolve_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """A copy of config with None / 'all-linear' target_modules made explicit, as PEFT saves them (and, with
    ensure_weight_tying, the tied embedding added and its heads taken out: nn/weight_tying.py)."""
    from . import weight_tying

    config = weight_tying.resolve(model, config)
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is None and there is no default for model type "
                f"{model_type!r}; name the modules, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'")
        return dataclasses.replace(config, target_modules=list(DEFAULT_TARGETS[model_type]))
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = output_head_path(model)
        names = {path for path, m in candidate_modules(model)
                 if (is_supported_base(m) or isinstance(m, LoraLinear)) and path != head and path}
        return dataclasses.replace(config, target_modules=sorted(names))
    return config


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    from .weight_tying import tied_targets

    tied = tied_targets(model, config)  # heads tied to a targeted embedding (ensure_weight_tying), wrapped last
    return [(path, m) for path, m in candidate_modules(model) if path and is_target(config, path) and path not in tied
            ] + [(path, model.get_submodule(path)) for path in tied]
