"""AdaLoRA adapters in PEFT's format: keys ``base_model.model.<path>.lora_{A,E,B}`` (no ``.weight``), config
``rank_pattern`` = {"<path>.lora_E": [bool] * init_r}; tensors are sliced to the kept ranks on save and
layers resized from rank_pattern on load (rank 0 allowed). ranknum (= init_r) is not saved, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME
from ..nn.adalora import STATE_ATTR, AdaLoraConfig, adalora_layers, adalora_state, inject_adalora
from ..nn.lora_linear import is_conv1d, is_supported_base
from ..nn.targets import find_targets, resolve_targets
from ..nn.transaction import model_transaction
from .atomic import atomic_path

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


def adalora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = adalora_state(model)
    name, pattern = state.adapter_name, state.config.rank_pattern or {}
    out = {}
    for path, layer in adalora_layers(model):
        if name not in layer.lora_A:
            continue
        a, e, b = (t[name].detach() for t in (layer.lora_A, layer.lora_E, layer.lora_B))
        keep = pattern.get(f"{path}.lora_E")
        if keep is not None and len(keep) == a.shape[0]:  # still at init_r: slice to the kept ranks
            idx = torch.tensor(keep, dtype=torch.bool, device=a.device)
            a, e, b = a[idx], e[idx], b[:, idx]
        for key, value in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
            out[f"{PREFIX}{path}.{key}"] = value.to("cpu").contiguous()
    return out


def save_adalora(model: nn.Module, directory: str) -> None:
    state = adalora_state(model)
    tensors = adalora_state_dict(model)
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    dataclasses.replace(state.config, base_model_name_or_path=name_or_path).save_pretrained(directory)


def load_adalora(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Inject at init_r, resize each layer to its rank_pattern, copy the tensors (all checked first)."""
    if STATE_ATTR in model.__dict__:
        raise ValueError("the model already holds an AdaLoRA adapter")
    config = AdaLoraConfig.from_pretrained(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    tensors = load_file(path)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    pattern = config.rank_pattern or {}
    expected = {}
    for p, module in find_targets(model, resolve_targets(model, config)):
        if not is_supported_base(module):
            raise TypeError(f"AdaLoRA targets nn.Linear and transformers' Conv1D; {p!r} is {type(module).__name__}")
        w = module.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])
        r = sum(pattern[f"{p}.lora_E"]) if f"{p}.lora_E" in pattern else config.init_r
        expected.update({f"{PREFIX}{p}.lora_A": (r, in_f), f"{PREFIX}{p}.lora_E": (r, 1),
                         f"{PREFIX}{p}.lora_B": (out_f, r)})
    problems = sorted(set(expected) ^ set(tensors)) + [
        f"{k}: file {tuple(tensors[k].shape)}, expected {v}" for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v]
    if problems:
        raise ValueError(f"{path} does not match its config / the model: {problems[:6]}")
    name = adapter_name
    with model_transaction(model), torch.no_grad():
        inject_adalora(model, config, adapter_name, init_weights=False)
        for p, layer in adalora_layers(model):
            if f"{p}.lora_E" in pattern:
                layer.resize(name, pattern[f"{p}.lora_E"])
            for key, table in (("lora_A", layer.lora_A), ("lora_E", layer.lora_E), ("lora_B", layer.lora_B)):
                table[name].copy_(tensors[f"{PREFIX}{p}.{key}"])
    return model

