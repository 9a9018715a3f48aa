"""AdaLoRA adapters in PEFT's format: keys ``base_model.model.<path>.lora_{A,E,B}`` (no ``.weight``), config
``rank_pattern`` = {"<path>.lora_E": [bool] * init_r}; tensors are sliced to the kept ranks on save and
layers resized from rank_pattern on load (rank 0 allowed). ranknum (= init_r) is not saved, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME
from ..nn.adalora import AdaLoraConfig, SVDLinear, adalora_layers, adalora_state, inject_adalora
from ..nn.inject import adapter_configs
from ..nn.lora_linear import is_conv1d, is_supported_base
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..nn.targets import find_targets, resolve_targets
from ..nn.transaction import model_transaction
from .adapter_files import write_pair
from .peft_format import _bias_params

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adalora_dir(directory: str) -> bool:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("peft_type") == "ADALORA"
    except (OSError, ValueError, AttributeError):
        return False


def _live_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the model's own tensor, for one AdaLoRA adapter: lora_{A,E,B}, its modules_to_save copies
    and the biases its ``bias`` setting saves (the keys ``io.peft_format`` writes for LoRA)."""
    out = {}
    for path, layer in adalora_layers(model):
        if layer.has_adapter(name):
            for suffix, tensor in layer.adapter_tensors(name).items():
                out[f"{PREFIX}{path}.{suffix}"] = tensor
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            for k, v in module.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{k}"] = v
    for k, v in _bias_params(model, adapter_configs(model)[name], name).items():
        out[f"{PREFIX}{k}"] = v
    return out


def adalora_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapter's PEFT-keyed tensors, lora_{A,E,B} sliced to the kept ranks of its rank_pattern."""
    state = adalora_state(model)
    name = adapter_name or state.adapter_name
    if name not in state.names():
        raise KeyError(f"unknown AdaLoRA adapter {name!r}; the model holds {state.names()}")
    pattern = adapter_configs(model)[name].rank_pattern or {}
    out = {k: v.detach() for k, v in _live_tensors(model, name).items()}
    for path, layer in adalora_layers(model):
        keep = pattern.get(f"{path}.lora_E")
        if name not in layer.lora_A or keep is None or len(keep) != layer.r[name]:
            continue  # already resized to the kept ranks (or no pattern yet)
        idx = torch.tensor(keep, dtype=torch.bool, device=layer.lora_A[name].device)
        for key in ("lora_A", "lora_E"):
            out[f"{PREFIX}{path}.{key}"] = out[f"{PREFIX}{path}.{key}"][idx]
        out[f"{PREFIX}{path}.lora_B"] = out[f"{PREFIX}{path}.lora_B"][:, idx]
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def save_adalora(model: nn.Module, directory: str, adapter_name: Optional[str] = None) -> None:
    """Write one AdaLoRA adapter (default: the trainable one, else the first) in PEFT's format, atomically."""
    state = adalora_state(model)
    name = adapter_name or state.adapter_name
    tensors = adalora_state_dict(model, name)
    config = adapter_configs(model)[name]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = dataclasses.replace(config, base_model_name_or_path=name_or_path, inference_mode=True)
    write_pair(directory, lambda tmp, metadata: save_file(tensors, tmp, metadata=metadata), config.to_json_string())


def load_adalora(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Inject at init_r, resize each layer to its rank_pattern, copy the tensors (all checked first; a
    failure leaves the model as it was). A further adapter joins the model's AdaLoRA adapters (PEFT's
    rule: at most one of them trainable)."""
    config = AdaLoraConfig.from_pretrained(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    tensors = load_file(path)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    pattern = config.rank_pattern or {}
    expected = {}
    for p, module in find_targets(model, resolve_targets(model, config)):
        if not (is_supported_base(module) or isinstance(module, SVDLinear)):
            raise TypeError(f"AdaLoRA targets nn.Linear and transformers' Conv1D; {p!r} is {type(module).__name__}")
        in_f, out_f = _features(module.base_layer if isinstance(module, SVDLinear) else module)
        r = sum(pattern[f"{p}.lora_E"]) if f"{p}.lora_E" in pattern else config.init_r
        expected.update({f"{PREFIX}{p}.lora_A": (r, in_f), f"{PREFIX}{p}.lora_E": (r, 1),
                         f"{PREFIX}{p}.lora_B": (out_f, r)})
    lora = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B")}
    problems = sorted(set(expected) ^ set(lora)) + [
        f"{k}: file {tuple(lora[k].shape)}, expected {v}" for k, v in expected.items()
        if k in lora and tuple(lora[k].shape) != v]
    if problems:
        raise ValueError(f"{path} does not match its config / the model: {problems[:6]}")
    name = adapter_name
    with model_transaction(model) as tx, torch.no_grad():
        inject_adalora(model, config, adapter_name, init_weights=False)
        for p, layer in adalora_layers(model):
            if f"{p}.lora_E" in pattern and layer.has_adapter(name):
                layer.resize(name, pattern[f"{p}.lora_E"])
        live = _live_tensors(model, name)
        # bias="all": PEFT also writes each modules_to_save copy's and original's bias; its loader ignores them.
        extra = sorted(k for k in set(tensors) - set(live) if not any(
            re.match(rf"(.*\.)?{re.escape(m)}\.(modules_to_save|original_module)\.", k[len(PREFIX):])
            for m in config.modules_to_save or ()))
        missing = sorted(set(live) - set(tensors))
        bad = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(live[k].shape)}" for k in live
               if k in tensors and tensors[k].shape != live[k].shape]
        if extra or missing or bad:  # modules_to_save / bias keys (the transaction undoes the injection)
            raise ValueError(f"{path} does not match its config / the model: unexpected {extra[:4]}, missing "
                             f"{missing[:4]}, shapes {bad[:4]}")
        for k, target in live.items():
            tx.write(target, tensors[k].to(target.dtype))
    return model


def _features(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])
