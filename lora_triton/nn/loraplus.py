"""LoRA+ (Hayou et al., 2024): B factors learn ``loraplus_lr_ratio`` times faster than A factors.

``create_loraplus_optimizer`` builds the same four parameter groups as PEFT's function of the same
name, in the same order, from parameter *names* (so it does not depend on PEFT's layer classes and
covers layer kinds by their parameter names once they exist here):

1. ``lr``: A factors and every other trainable parameter with two or more dimensions;
2. ``loraplus_lr_embedding``: the parameters of a LoRA embedding layer (``lora_embedding_A/B``);
3. ``lr * ratio``: B factors and 1-D parameters (DoRA's ``lora_magnitude_vector`` too), with decay;
4. ``lr * ratio`` without weight decay: those of group 3 named ``*bias*`` or living in a LayerNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names PEFT (via transformers' get_parameter_names) exempts from weight decay."""
    out = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            out.update(f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters())
    out.update(n for n, _ in model.named_parameters() if "bias" in n)
    return out


def _is_embedding_factor_holder(model: nn.Module, name: str) -> bool:
    # PEFT's test: the module two name parts up (the tuner layer above the ParameterDict) is a LoRA
    # Embedding. Here: a module that holds embedding factors, or the factors' own names.
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in EMBEDDING_FACTORS:
        return True
    holder = ".".join(parts[:-2])
    if not holder:
        return False
    try:
        module = model.get_submodule(holder)
    except AttributeError:
        return False
    return any(hasattr(module, f) for f in EMBEDDING_FACTORS)


def loraplus_param_groups(model: nn.Module, *, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6,
                          loraplus_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The four optimizer parameter groups (dicts with ``params``, ``lr``, ``weight_decay``, ``names``)."""
    for key, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                       ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{key} must be a non-negative number, got {value!r}")
    no_decay = _no_decay_names(model)
    groups: dict[str, dict[str, torch.nn.Parameter]] = {k: {} for k in ("A", "embedding", "B", "B_no_decay")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_embedding_factor_holder(model, name):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"][name] = param
        else:
            groups["A"][name] = param
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters (inject or load an adapter with is_trainable=True)")
    spec = (("A", lr, loraplus_weight_decay), ("embedding", loraplus_lr_embedding, loraplus_weight_decay),
            ("B", lr * loraplus_lr_ratio, loraplus_weight_decay), ("B_no_decay", lr * loraplus_lr_ratio, 0.0))
    return [{"params": list(groups[k].values()), "names": list(groups[k]), "lr": group_lr, "weight_decay": wd}
            for k, group_lr, wd in spec]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                              loraplus_weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over LoRA+'s parameter groups; ``kwargs`` go to the optimizer (betas, eps...)."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                   loraplus_lr_embedding=loraplus_lr_embedding,
                                   loraplus_weight_decay=loraplus_weight_decay)
    # Optimizers keep unknown group keys; the names stay out of state_dict comparisons with PEFT's.
    for g in groups:
        g.pop("names")
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes  # embeddings stay 32-bit in 8-bit optimizers, as PEFT arranges

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
