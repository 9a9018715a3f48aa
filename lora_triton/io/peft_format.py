"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Disk keys are ``base_model.model.<module path>.lora_A.weight`` etc. (no adapter name); ours carry
the adapter name (``<path>.lora_A.<name>.weight``), as PEFT's in-memory names do. Loading checks the
whole file against the model before it changes anything, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME, LoraConfig
from ..nn import kinds
from ..nn.inject import adapter_configs, inject_lora, lora_layers, set_adapter
from ..nn.lora_linear import LoraLinear
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..nn.targets import find_targets, resolve_targets
from .atomic import atomic_path

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _adapter_dir(directory: str, adapter_name: str) -> str:
    """PEFT saves non-default adapters to <dir>/<name>/; accept both layouts."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    nested = os.path.join(directory, adapter_name)
    if os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        return nested
    raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r} (nor in {nested!r})")


def read_peft_adapter(directory: str, adapter_name: str = "default") -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and the raw tensors (PEFT keys) of an adapter directory; pickle files are refused."""
    folder = _adapter_dir(directory, adapter_name)
    config = kinds.read_config(folder)  # the config class of the file's peft_type
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise ValueError(f"{folder} holds adapter_model.bin (pickle); lora_triton loads safetensors only. "
                             "Convert it once with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir)")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    return config, tensors


def _bias_params(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    if getattr(config, "bias", "none") == "none":
        return {}
    if config.bias == "lora_only":
        return {f"{p}.base_layer.bias": layer.base_layer.bias for p, layer in lora_layers(model)
                if kinds.holds_adapter(layer, adapter_name) and getattr(layer.base_layer, "bias", None) is not None}
    return {k: v for k, v in model.named_parameters()
            if k.endswith(".bias") and ".lora_" not in k and ".modules_to_save." not in k
            and ".original_module." not in k}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of one adapter (no adapter name in the keys)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(configs)}")
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if not isinstance(layer, LoraLinear):
            if layer.has_adapter(adapter_name):  # other kinds / layer types: their own key names
                for suffix, tensor in layer.adapter_tensors(adapter_name).items():
                    out[f"{PREFIX}{path}.{suffix}"] = tensor
            continue
        if adapter_name not in layer.lora_A:
            continue
        out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if layer.lora_B[adapter_name].bias is not None:
            out[f"{PREFIX}{path}.lora_B.bias"] = layer.lora_B[adapter_name].bias
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k, v in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    for k, v in _bias_params(model, configs[adapter_name], adapter_name).items():
        out[f"{PREFIX}{k}"] = v
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Write one adapter to ``directory`` in PEFT's format; each file replaced atomically."""
    tensors = adapter_state_dict(model, adapter_name)
    config = adapter_configs(model)[adapter_name]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    config = dataclasses.replace(config, base_model_name_or_path=name_or_path or None)
    os.makedirs(directory, exist_ok=True)
    # Weights first, then the config that describes them: a crash in between leaves the old
    # config, whose shapes the loader checks, never a config pointing at missing weights.
    with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    config.save_pretrained(directory)


def _plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str):
    """Check every key and shape against the model; returns [(target tensor getter, source)] steps."""
    resolved = resolve_targets(model, config)
    targets = dict(find_targets(model, resolved))
    modules = dict(model.named_modules())
    dict(model.named_parameters())
    lora: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    generic = _plan_generic(resolved, targets, tensors)
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r}: PEFT keys start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        if any(rest.startswith(p + ".") and rest[len(p) + 1:] in parts for p, parts in generic.items()):
            continue
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
            if rest.endswith("." + suffix):
                lora.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            if ".lora_magnitude_vector" in rest:
                raise NotImplementedError(f"key {key!r}: DoRA adapters are not supported yet")
            plain[rest] = value
    for path, parts in lora.items():
        if path not in targets:
            where = "the model has no module" if path not in modules else "the config does not target module"
            raise ValueError(f"adapter weights for {path!r}, but {where} {path!r} "
                             f"(target_modules={config.target_modules!r})")
        module = targets[path]
        in_f, out_f = (module.in_features, module.out_features) if isinstance(module, LoraLinear) else (
            (module.weight.shape[0], module.weight.shape[1]) if type(module).__name__ == "Conv1D"
            else (module.in_features, module.out_features))
        r = resolved.rank_for(path)
        for suffix, shape in (("lora_A.weight", (r, in_f)), ("lora_B.weight", (out_f, r))):
            if suffix not in parts:
                raise ValueError(f"missing key {PREFIX}{path}.{suffix} (expected shape {shape})")
            got = tuple(parts[suffix].shape)
            if got != shape:
                hint = " (rank disagrees with the config's r / rank_pattern)" if got[:1] != shape[:1] or \
                    got[1:] != shape[1:] else ""
                raise ValueError(f"{PREFIX}{path}.{suffix}: shape {got} in the file, expected {shape}{hint}")
        if ("lora_B.bias" in parts) != bool(resolved.lora_bias):
            raise ValueError(f"{PREFIX}{path}.lora_B.bias presence disagrees with lora_bias={resolved.lora_bias}")
    missing = sorted(set(targets) - set(lora) - set(generic))
    if missing:
        raise ValueError(f"missing adapter weights for targeted modules {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (keys {PREFIX}<module>.lora_A.weight)")
    for rest in list(plain):
        # bias="all" makes PEFT also write the bias of each modules_to_save copy and original
        # (`<m>.modules_to_save.bias`, `<m>.original_module.bias`); PEFT's loader ignores them too.
        if any(re.match(rf"(.*\.)?{re.escape(m)}\.(modules_to_save|original_module)\.", rest)
               for m in config.modules_to_save or ()):
            del plain[rest]
    for rest, value in plain.items():
        wrapper, sub = _saved_module_for(model, rest)
        state = (wrapper.original_module if wrapper is not None else model).state_dict(keep_vars=True)
        name = sub if wrapper is not None else rest
        target = state.get(name)
        if target is None and ".base_layer." in name:
            # `<path>.base_layer.bias` (bias="lora_only"/"all") names a module not wrapped yet.
            target = state.get(name.replace(".base_layer.", ".", 1))
        if target is None:
            raise ValueError(f"unexpected key {PREFIX}{rest}: no such parameter or buffer in the model")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{PREFIX}{rest}: shape {tuple(value.shape)} in the file, model has {tuple(target.shape)}")
    lora.update(generic)
    return resolved, lora, plain


def _plan_generic(config, targets: dict, tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Keys of the targets that are not LoRA-on-Linear (nn/kinds.py layer types): path -> {suffix: tensor},
    every suffix and shape checked against what the layer type expects."""
    kind = kinds.kind_of(config)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, module in targets.items():
        lt = kinds.check_target(config, module, path)
        if lt is kinds.LORA_LINEAR:
            continue
        base = module.base_layer if kinds.is_adapter_layer(module) else module
        expected = lt.shapes(base, config, path)
        parts = {}
        for suffix, shape in expected.items():
            key = f"{PREFIX}{path}.{suffix}"
            if key not in tensors:
                raise ValueError(f"missing key {key} (expected shape {shape} for a {kind.peft_type} adapter on "
                                 f"this {type(base).__name__})")
            got = tuple(tensors[key].shape)
            if got != tuple(shape):
                raise ValueError(f"{key}: shape {got} in the file, expected {tuple(shape)} for a {kind.peft_type} "
                                 f"adapter on this {type(base).__name__} (rank, kernel size or factorisation "
                                 "disagrees with the config)")
            parts[suffix] = tensors[key]
        stray = sorted(k for k in tensors if k.startswith(f"{PREFIX}{path}.") and
                       k[len(PREFIX) + len(path) + 1:].split(".")[0] in _adapter_key_heads(kind)
                       and k[len(PREFIX) + len(path) + 1:] not in expected)
        if stray:
            raise ValueError(f"unexpected keys {stray[:3]} for module {path!r}: this config makes it hold "
                             f"{sorted(expected)}")
        out[path] = parts
    return out


def _adapter_key_heads(kind) -> set[str]:
    heads = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
    if kind.peft_type != "LORA":
        heads |= {a for lt in kind.layer_types for a in lt.layer_class.param_dicts}
    return heads


def _saved_module_for(model: nn.Module, key: str):
    """(ModulesToSaveWrapper, key inside it) when ``key`` lies under one, else (None, key)."""
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and key.startswith(path + "."):
            return module, key[len(path) + 1:]
    return None, key


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False,
                 config: Optional[LoraConfig] = None) -> nn.Module:
    """Load a PEFT-format adapter into ``model`` (injecting LoRA layers as needed) under ``adapter_name``."""
    file_config, tensors = read_peft_adapter(directory, adapter_name)
    config = config or file_config
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; loaded: {sorted(adapter_configs(model))}")
    resolved, lora, plain = _plan_load(model, config, tensors, adapter_name)
    inject_lora(model, dataclasses.replace(kinds.without_init(resolved), inference_mode=not is_trainable),
                adapter_name)
    adapter_configs(model)[adapter_name] = dataclasses.replace(resolved, inference_mode=not is_trainable)
    with torch.no_grad():
        layers = dict(lora_layers(model))
        for path, parts in lora.items():
            layer = layers[path]
            if not isinstance(layer, LoraLinear):
                own = layer.adapter_tensors(adapter_name)
                for suffix, value in parts.items():
                    own[suffix].copy_(value)
                continue
            layer.lora_A[adapter_name].weight.copy_(parts["lora_A.weight"])
            layer.lora_B[adapter_name].weight.copy_(parts["lora_B.weight"])
            if "lora_B.bias" in parts:
                layer.lora_B[adapter_name].bias.copy_(parts["lora_B.bias"])
        for rest, value in plain.items():
            wrapper, sub = _saved_module_for(model, rest)
            if wrapper is not None:
                wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True)[sub].copy_(value)
            else:
                model.state_dict(keep_vars=True)[rest].copy_(value)
    if not is_trainable:
        for _, layer in lora_layers(model):
            if kinds.holds_adapter(layer, adapter_name):
                for p in kinds.adapter_parameters(layer, adapter_name):
                    p.requires_grad_(False)
    else:
        set_adapter(model, adapter_name)
    return model
