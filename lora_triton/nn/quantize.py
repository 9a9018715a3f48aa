"""``lora_triton.quantize``: replace a model's Linear / GPT-2 Conv1D layers by 4-bit ``NF4Linear`` in place."""

from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn

from ..reference.nf4 import BLOCKSIZES, QUANT_TYPES
from .adapter_layer import AdapterLayer
from .lora_linear import LoraLinear, is_conv1d
from .nf4_linear import _DTYPES, NF4Linear, is_bnb_linear4bit

# transformers keeps the output head in full precision when it loads a model in 4 bits; so do we.
DEFAULT_SKIP = ("lm_head",)


def _matches(path: str, target_modules: Union[str, list[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def quantize(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             compute_dtype: Optional[torch.dtype] = None,
             target_modules: Optional[Union[str, list[str]]] = None) -> nn.Module:
    """Store the weights of ``model``'s Linear / Conv1D layers in 4 bits (bitsandbytes' format), in place.

    target_modules: None = every Linear / Conv1D except ``lm_head``; a list = module names matched as
    path suffixes (PEFT's rule); a string = a regex matched against the full path. bitsandbytes
    ``Linear4bit`` layers found anywhere are adopted as they are (their bytes, not requantized).
    compute_dtype: the dtype of dequantized / merged weights (default: each layer's weight dtype).
    Everything is checked before the first layer changes; returns ``model``.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if compute_dtype is not None and compute_dtype not in _DTYPES.values():
        raise ValueError(f"compute_dtype must be one of {list(_DTYPES.values())} or None, got {compute_dtype}")
    if target_modules is not None and not isinstance(target_modules, (str, list, tuple, set)):
        raise TypeError(f"target_modules must be None, a regex string or a list of names, got {target_modules!r}")
    if isinstance(target_modules, (tuple, set)):
        target_modules = sorted(target_modules)
    if any(isinstance(m, (LoraLinear, AdapterLayer)) for m in model.modules()):
        raise ValueError("the model already holds LoRA layers: quantize the base model first, then inject adapters")
    plan = []
    for path, module in model.named_modules():
        if not path or isinstance(module, NF4Linear):
            continue
        if is_bnb_linear4bit(module):
            plan.append((path, module, "bnb"))
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            chosen = (not any(_matches(path, [s]) for s in DEFAULT_SKIP) if target_modules is None
                      else _matches(path, target_modules))
            if chosen:
                if not module.weight.is_floating_point():
                    raise TypeError(f"{path}: weight dtype {module.weight.dtype} cannot be quantized")
                plan.append((path, module, "float"))
    if target_modules is not None and not any(kind == "float" for _, _, kind in plan):
        raise ValueError(f"target_modules={target_modules!r} matched no Linear / Conv1D module")
    for path, module, kind in plan:
        if kind == "bnb":
            new = NF4Linear.from_bnb(module, compute_dtype)
        else:
            weight = module.weight.detach()
            new = NF4Linear.from_weight(weight.t() if is_conv1d(module) else weight,
                                        None if module.bias is None else module.bias.detach(),
                                        quant_type, blocksize, double_quant, compute_dtype)
        new.train(module.training)
        _set_child(model, path, new)
    return model
