"""AdaLoRA adapters in PEFT's format: keys ``base_model.model.<path>.lora_{A,E,B}`` (no ``.weight``), config
``rank_pattern`` = {"<path>.lora_E": [bool] * init_r}; tensors are sliced to the kept ranks on save
(``save_adapter`` comes here for an AdaLoRA adapter) and layers built at the kept ranks on load (rank 0
allowed; ``load_adapter`` through the registry's ADALORA kind, ``nn/adalora.py``). ranknum (= init_r) is
not saved, as in PEFT.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..nn.adalora import adalora_layers, adalora_state
from ..nn.inject import adapter_configs
from .config_json import CONFIG_NAME, read_config_json
from .peft_format import PREFIX, adapter_state_dict, load_adapter, write_adapter


def is_adalora_dir(directory: str) -> bool:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    try:
        return read_config_json(path).get("peft_type") == "ADALORA"
    except (OSError, ValueError):  # unreadable, not JSON, or not an object: not an AdaLoRA folder
        return False


def adalora_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapter's PEFT-keyed tensors, lora_{A,E,B} sliced to the kept ranks of its rank_pattern."""
    state = adalora_state(model)
    name = adapter_name or state.adapter_name
    if name not in state.names():
        raise KeyError(f"unknown AdaLoRA adapter {name!r}; the model holds {state.names()}")
    pattern = adapter_configs(model)[name].rank_pattern or {}
    # PEFT's keys, as for LoRA: lora_{A,E,B} (the layers' adapter_tensors), modules_to_save copies, biases
    out = adapter_state_dict(model, name)
    for path, layer in adalora_layers(model):
        keep = pattern.get(f"{path}.lora_E")
        if name not in layer.lora_A or keep is None or len(keep) != layer.r[name]:
            continue  # already resized to the kept ranks (or no pattern yet)
        idx = torch.tensor(keep, dtype=torch.bool)
        for key in ("lora_A", "lora_E"):
            out[f"{PREFIX}{path}.{key}"] = out[f"{PREFIX}{path}.{key}"][idx]
        out[f"{PREFIX}{path}.lora_B"] = out[f"{PREFIX}{path}.lora_B"][:, idx]
    return {k: v.contiguous() for k, v in out.items()}


def save_adalora(model: nn.Module, directory: str, adapter_name: Optional[str] = None) -> None:
    """Write one AdaLoRA adapter (default: the trainable one, else the first) in PEFT's format, atomically."""
    state = adalora_state(model)
    name = adapter_name or state.adapter_name
    write_adapter(model, directory, name, adalora_state_dict(model, name), inference_mode=True)


def load_adalora(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """``load_adapter`` for an AdaLoRA folder (the registry's ADALORA kind builds each layer at its saved ranks)."""
    if not is_adalora_dir(directory):
        raise ValueError(f"{directory!r} holds no AdaLoRA adapter (peft_type 'ADALORA' in {CONFIG_NAME})")
    return load_adapter(model, directory, adapter_name, is_trainable=is_trainable)
