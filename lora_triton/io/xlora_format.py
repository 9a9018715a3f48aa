"""X-LoRA on disk: ``adapter_config.json`` (XLoraConfig), the classifier in ``adapter_model.safetensors``
under PEFT's in-memory keys (``base_model.internal_xlora_classifier.layers.<i>.weight``), and each expert
as a plain PEFT LoRA adapter in ``<dir>/<expert name>/``.

PEFT 0.21.2's own X-LoRA save is lossy (the first classifier layer goes missing from the main file, the
expert folders get base weights and classifier copies, and its reload gives other logits), so its
X-LoRA folders are not read here; its plain LoRA expert folders are. Ours load in PEFT with
``PeftModel.from_pretrained(model, dir)`` when the experts are named "0".."n-1" (the only names PEFT
0.21.2 handles); PEFT reads the experts from the absolute paths in the config, so move the folder only
with ours (which reads ``<dir>/<name>`` first).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..nn.xlora import XLoraModel
from ..nn.xlora_config import XLoraConfig
from .atomic import atomic_path
from .peft_format import WEIGHTS_NAME, save_adapter

CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."


def save_xlora(xmodel: XLoraModel, directory: str) -> None:
    """Experts first (each folder atomic), then the classifier, then the config that describes them."""
    if not isinstance(xmodel, XLoraModel):
        raise TypeError(f"save_xlora expects an XLoraModel, got {type(xmodel).__name__}")
    os.makedirs(directory, exist_ok=True)
    for name in xmodel.config.expert_names:
        save_adapter(xmodel.model, os.path.join(directory, name), adapter_name=name)
    tensors = {CLASSIFIER_PREFIX + k: v.detach().to("cpu").contiguous()
               for k, v in xmodel.internal_xlora_classifier.state_dict().items()}
    with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    # Absolute expert paths: PEFT 0.21.2 loads the experts from these (its `adapters=` override only applies
    # to a model that already is an X-LoRA model); our loader prefers <dir>/<name>, so the folder can move.
    config = dataclasses.replace(xmodel.config, adapters={
        n: os.path.abspath(os.path.join(directory, n)) for n in xmodel.config.expert_names})
    config.save_pretrained(directory)


def load_xlora(model: nn.Module, directory: str, adapters: Optional[dict] = None,
               is_trainable: bool = False) -> XLoraModel:
    """An XLoraModel from ``save_xlora``'s folder; ``adapters`` overrides the experts' paths (PEFT's kwarg)."""
    config = XLoraConfig.from_pretrained(directory)
    paths = dict(adapters) if adapters is not None else {
        n: os.path.join(directory, n) if os.path.isdir(os.path.join(directory, n)) else p
        for n, p in config.adapters.items()}
    if list(paths) != config.expert_names:
        raise ValueError(f"adapters must name the saved experts {config.expert_names} in order, got {list(paths)}")
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (the X-LoRA classifier) in {directory!r}")
    tensors = load_file(path)
    state = {}
    for key, value in tensors.items():
        if not key.startswith(CLASSIFIER_PREFIX):
            raise ValueError(f"unexpected key {key!r} in {path}: classifier keys start with {CLASSIFIER_PREFIX!r}")
        state[key[len(CLASSIFIER_PREFIX):]] = value
    config = dataclasses.replace(config, adapters=paths, inference_mode=not is_trainable)
    xmodel = XLoraModel(model, config)
    expected = xmodel.internal_xlora_classifier.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if problems:
        xmodel.unload()
        raise ValueError(f"X-LoRA classifier in {path} does not fit the config: {problems}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    xmodel.internal_xlora_classifier.requires_grad_(is_trainable)
    return xmodel
