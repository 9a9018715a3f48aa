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
            if adapter_name in layer.lora_magnitude_vector:  # DoRA (disk key without ".weight")
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = f"{path}.lora_magnitude_vector.{adapter_name}.weight"
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


def load_checkpoint_adapters(model: nn.Module, checkpoint_dir) -> list[str]:
    """Copy the adapters a Trainer checkpoint holds (this module's layout: ``dir/`` for "default",
    ``dir/<name>/`` for the others) into the model's existing adapters, in place: parameter objects
    stay, so the optimizer state Trainer restores next maps onto the same tensors. Every key and
    shape is checked before the first copy; a mismatch is a ValueError and changes nothing."""
    from .peft_format import WEIGHTS_NAME, read_peft_adapter

    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model holds no lora_triton adapter to resume")
    state = model.state_dict(keep_vars=True)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in configs:
        folder = os.fspath(checkpoint_dir) if name == "default" else os.path.join(checkpoint_dir, name)
        if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            raise ValueError(f"checkpoint {os.fspath(checkpoint_dir)!r} has no {WEIGHTS_NAME} for adapter {name!r} "
                             f"(looked in {folder!r})")
        _config, tensors = read_peft_adapter(folder, name)
        # Adapter tensors by their mapping; plain keys (bias="all"/"lora_only" biases) by their own name.
        internal = {k: v for k, v in _internal_keys(model, name).items() if v in state}
        where = {key: internal.get(key, key[len(PREFIX):]) for key in tensors}
        missing = sorted(set(internal) - set(tensors))
        unexpected = sorted(k for k, v in where.items() if v not in state)
        if missing or unexpected:
            raise ValueError(f"checkpoint adapter {name!r} at {folder!r} does not match the model: "
                             f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for key, value in tensors.items():
            target = state[where[key]]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"checkpoint adapter {name!r}: {key} has shape {tuple(value.shape)}, "
                                 f"the model's {where[key]} has {tuple(target.shape)}")
            plan.append((target, value))
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
    return list(configs)


def enable_trainer_resume(trainer) -> None:
    """``trainer.train(resume_from_checkpoint=...)`` for a lora_triton-injected model: transformers
    restores adapter checkpoints only into PeftModel objects, so this routes the weight load of this
    trainer instance (an instance attribute, no class patch) to ``load_checkpoint_adapters``; optimizer,
    scheduler and RNG states are restored by Trainer as usual. Other models keep Trainer's loader."""
    original = trainer._load_from_checkpoint

    def _load_from_checkpoint(resume_from_checkpoint, model=None):
        target = trainer.model if model is None else model
        if adapter_configs(target):
            load_checkpoint_adapters(target, resume_from_checkpoint)
        else:
            original(resume_from_checkpoint, model)

    trainer._load_from_checkpoint = _load_from_checkpoint
