"""An injected transformers model saves like a PEFT model.

``inject_lora`` installs an instance-level ``save_pretrained`` on transformers models, so
``model.save_pretrained(dir)`` -- and therefore ``Trainer.save_model`` and Trainer checkpoints -- write
each adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, modules_to_save
included; non-default adapters in ``dir/<name>/`` as PEFT lays them out). ``PeftModel.from_pretrained``
and ``lt.load_adapter`` read the result. The full transformers save stays one keyword away
(``full_model=True``, lora_triton's own key names) or, for a standalone model, ``merge_and_unload`` first:
with no adapter left the hook defers to transformers.
"""

from __future__ import annotations

import os
import types
from typing import Optional

import torch
from torch import nn

from ..nn.adapter_layer import AdapterLayer
from ..nn.inject import adapter_configs, adapter_layers, lora_layers
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..nn.summary import print_trainable_parameters
from .peft_format import PREFIX, adapter_state_dict, save_adapter

HOOK_ATTR = "_lora_triton_save_hook"


def is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def install_peft_methods(model: nn.Module) -> None:
    """On transformers models (idempotent): ``model.save_pretrained`` writes PEFT adapters, and
    ``model.print_trainable_parameters()`` exists as on a PeftModel."""
    if is_transformers_model(model) and HOOK_ATTR not in model.__dict__:
        model.save_pretrained = types.MethodType(save_pretrained, model)
        model.print_trainable_parameters = types.MethodType(print_trainable_parameters, model)
        model.__dict__[HOOK_ATTR] = True


def _internal_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """PEFT disk key -> the model's own state-dict key, for the tensors of one adapter."""
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for part in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
                table, leaf = part.split(".")
                out[f"{PREFIX}{path}.{part}"] = f"{path}.{table}.{adapter_name}.{leaf}"
    own_names = {id(p): n for n, p in model.named_parameters()}
    for path, layer in adapter_layers(model):  # other kinds / layer types (nn/kinds.py): their own keys
        if isinstance(layer, AdapterLayer) and layer.has_adapter(adapter_name):
            for suffix, tensor in layer.adapter_tensors(adapter_name).items():
                if id(tensor) in own_names:
                    out[f"{PREFIX}{path}.{suffix}"] = own_names[id(tensor)]
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key in module.modules_to_save[adapter_name].state_dict():
                out[f"{PREFIX}{path}.{key}"] = f"{path}.modules_to_save.{adapter_name}.{key}"
    return out


def _tensors(model: nn.Module, adapter_name: str, state_dict: Optional[dict]) -> dict[str, torch.Tensor]:
    """The adapter's PEFT-keyed tensors; values come from ``state_dict`` when the caller gathered one
    (Trainer does under FSDP / DeepSpeed), else from the model's own parameters."""
    tensors = adapter_state_dict(model, adapter_name)
    if state_dict is not None:
        internal = _internal_keys(model, adapter_name)
        for key in tensors:
            source = state_dict.get(internal.get(key, key[len(PREFIX):]))
            if source is not None:
                tensors[key] = source.detach().to("cpu").contiguous()
    return tensors


def save_pretrained(model: nn.Module, save_directory, *, full_model: bool = False, is_main_process: bool = True,
                    state_dict: Optional[dict] = None, selected_adapters: Optional[list[str]] = None, **kwargs):
    """PEFT's ``save_pretrained`` for a lora_triton-injected transformers model (see the module docstring)."""
    configs = adapter_configs(model)
    if full_model or not configs:
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, **kwargs)
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise KeyError(f"selected_adapters {unknown} are not loaded; loaded adapters: {sorted(configs)}")
    if not is_main_process:
        return None
    for name in names:
        folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
        save_adapter(model, folder, name, tensors=_tensors(model, name, state_dict))
    return None
