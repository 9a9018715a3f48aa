"""Model-level API: inject adapters, choose the active ones, disable, merge, unload."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

from torch import nn

from ..config import LOAD_ONLY_INITS, LoraConfig
from .grouping import group_siblings, ungroup_siblings
from .kinds import (
    adapter_parameters,
    attach,
    check_target,
    coerce_config,
    holds_adapter,
    is_adapter_layer,
    layer_classes,
)
from .loftq import loftq_layer
from .lora_linear import LoraLinear, is_supported_base, merge_is_finite
from .modules_to_save import ModulesToSaveWrapper
from .nf4_linear import NF4Linear
from .qlora import unloaded_base
from .targets import candidate_modules, find_targets, resolve_targets
from .transaction import transactional
from .weight_tying import tie_adapters

CONFIGS_ATTR = "_lora_triton_configs"


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into ``model``, by adapter name."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module):
    """The model's LoraLinear layers (LoRA / DoRA on Linear and Conv1D)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]


def adapter_layers(model: nn.Module):
    """Every adapter layer of the model: LoraLinear and the other kinds' / layer types' (nn/kinds.py)."""
    return [(p, m) for p, m in model.named_modules() if is_adapter_layer(m)]


def _wrappers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (*layer_classes(), ModulesToSaveWrapper))]


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def _check_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if adapter_name == "__base__":
        raise ValueError("'__base__' is reserved for 'no adapter' in mixed batches")


@transactional  # all of it or none: a failure half-way leaves the model as it was
def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap every targeted module of ``model`` in place with an adapter layer holding ``adapter_name``.

    ``config`` is a LoraConfig (Linear / Conv1D -> LoraLinear, Embedding -> LoraEmbedding, Conv1d/2d/3d
    -> LoraConv), a LoHaConfig or a LoKrConfig; nn/kinds.py maps each kind and layer type to its layer.

    Freezes everything but LoRA parameters (plus biases per ``config.bias`` and modules_to_save).
    A second call with another name adds a second adapter to the same layers; the active adapters
    stay as they were (``set_adapter`` switches), as in PEFT. Sibling projections that read the
    same tensor (q/k/v, gate/up) are grouped (``nn.grouping``; ``ungroup_siblings`` undoes it).
    """
    config = coerce_config(config)  # ours (LoRA / LoHa / LoKr) or PEFT's LoraConfig; else a TypeError
    if getattr(config, "peft_type", None) == "ADALORA":  # its layers and its rank allocator: nn/adalora.py
        from .adalora import inject_adalora

        return inject_adalora(model, config, adapter_name)
    config.validate()  # fields may have been changed since construction
    _check_name(adapter_name)
    if getattr(config, "init_lora_weights", None) in LOAD_ONLY_INITS:
        raise NotImplementedError(f"init_lora_weights={config.init_lora_weights!r}: lora_triton loads such "
                                  "adapters but cannot initialise new ones (use True, False or 'gaussian')")
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; loaded: {sorted(configs)}")
    config = resolve_targets(model, config)
    targets = find_targets(model, config)
    if not targets:
        names = [p for p, m in candidate_modules(model) if p and is_supported_base(m)][:8]
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; "
                         f"linear modules in this model include {names}")
    for path, module in targets:
        check_target(config, module, path)  # every target before any is wrapped
    first = not configs
    previous_active = active_adapters(model)  # before new LoraLinears (active = [adapter_name]) exist
    for path, module in targets:
        if getattr(config, "init_lora_weights", None) == "loftq":  # quantizes the base itself
            args = (config.rank_for(path), config.alpha_for(path), config.lora_dropout, config.use_rslora,
                    config.init_lora_weights, config.lora_bias, config.use_dora)
            _set_child(model, path, loftq_layer(module, adapter_name, args, config.loftq_config))
            continue
        wrapped = attach(module, adapter_name, config, path)  # nn/kinds.py: the layer type's wrapper
        if wrapped is not module:
            # A new module starts in training mode: take the wrapped layer's, or an eval model drops out.
            _set_child(model, path, wrapped.train(module.training))
    tie_adapters(model, config, adapter_name)  # ensure_weight_tying: tied heads share the embedding's factors
    add_modules_to_save(model, config, adapter_name)
    configs[adapter_name] = config
    active = [adapter_name] if first else previous_active
    set_adapter(model, active)
    # Sibling projections (q/k/v, gate/up) share one shrink when they are provably called on
    # the same tensor (nn/grouping.py); anything else runs each layer's own forward.
    group_siblings(model)
    from ..io.hf_integration import install_peft_methods  # io imports nn: resolved at call time

    install_peft_methods(model)  # transformers models: save_pretrained writes PEFT's adapter format
    return model


def add_modules_to_save(model: nn.Module, config, adapter_name: str) -> None:
    """Wrap (or extend) the modules named by ``config.modules_to_save`` with ``adapter_name``'s trainable copy."""
    for path, module in list(candidate_modules(model)):
        # PEFT's rule is a plain suffix test (no dot boundary): "head" also wraps "lm_head".
        if config.modules_to_save and path and any(path.endswith(m) for m in config.modules_to_save):
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else \
                ModulesToSaveWrapper(module).train(module.training)
            wrapper.add_adapter(adapter_name)
            if wrapper is not module:
                _set_child(model, path, wrapper)


def active_adapters(model: nn.Module) -> list[str]:
    for m in _wrappers(model):
        return list(m.active_adapters)
    return []


def _mark_trainable(model: nn.Module, active: list[str]) -> None:
    configs = adapter_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _path, layer in adapter_layers(model):
        for name in active:
            if holds_adapter(layer, name):
                for p in adapter_parameters(layer, name):  # LoRA factors, DoRA magnitudes, LoHa/LoKr factors
                    p.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper):
            for name in active:
                if name in m.modules_to_save:
                    m.modules_to_save[name].requires_grad_(True)
    biases = {getattr(configs[n], "bias", "none") for n in active if n in configs}
    if "all" in biases:
        for name, p in model.named_parameters():
            if name.endswith("bias") and "modules_to_save" not in name and "original_module" not in name:
                p.requires_grad_(True)
    elif "lora_only" in biases:
        for _, layer in adapter_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def set_adapter(model: nn.Module, name_or_names: Union[str, list[str]]) -> None:
    """Make these adapters the active ones (their parameters trainable, the others frozen)."""
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {sorted(known)}")
    for m in _wrappers(model):
        m.active_adapters = list(names)
    _mark_trainable(model, names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base (merged adapters are unmerged first)."""
    wrappers = _wrappers(model)
    previous = [m.disable_adapters for m in wrappers]
    for m in wrappers:
        m.disable_adapters = True
    try:
        yield model
    finally:
        for m, was in zip(wrappers, previous):
            m.disable_adapters = was


def merge_adapter(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """Fold the adapters (default: the active ones) into the base weights, in fp32, rounding once.

    With safe_merge the merged weights are checked first: a non-finite result raises and no layer
    of the model is changed.
    """
    layers = [m for _, m in adapter_layers(model)]
    if adapter_names is not None:
        known = adapter_configs(model)
        missing = [n for n in adapter_names if n not in known]
        if missing:
            raise KeyError(f"unknown adapters {missing}; loaded adapters: {sorted(known)}")
    # adapter_names=[] merges nothing, as in PEFT; only None means "the active adapters".
    # Whatever a layer would refuse is refused here, before the first layer changes.
    for path, layer in lora_layers(model):
        names = [n for n in (layer.active_adapters if adapter_names is None else adapter_names) if n in layer.lora_A]
        if layer.base_layer.bias is None and not isinstance(layer.base_layer, NF4Linear) and any(
                layer.lora_B[n].bias is not None for n in names if n not in layer.merged_adapters):
            raise ValueError(f"{path}: cannot merge lora_bias into a base layer that has no bias; nothing was changed")
    if safe_merge:
        for layer in layers:
            names = [n for n in (layer.active_adapters if adapter_names is None else adapter_names)
                     if holds_adapter(layer, n) and n not in layer.merged_adapters]
            merged = layer.merged_as_stored(names) if names else None
            if merged is not None and not merge_is_finite(*merged):
                raise ValueError(f"safe_merge: merging {names} gives non-finite weights in "
                                 f"{merged[0].dtype}; nothing was changed")
    for layer in layers:
        names = [n for n in (layer.active_adapters if adapter_names is None else adapter_names)
                 if holds_adapter(layer, n)]
        layer.merge(names, safe_merge=safe_merge)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                     requantize: bool = False):
    """Merge, then put the plain base layers back; modules_to_save keep the active adapter's copy.

    4-bit bases come back as full-precision Linears in their compute dtype (W_deq + s B A, one rounding);
    ``requantize=True`` quantizes them again, with a warning (``nn.qlora``)."""
    merge_adapter(model, adapter_names, safe_merge)
    ungroup_siblings(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            _set_child(model, path, unloaded_base(module, requantize))
        elif is_adapter_layer(module):
            _set_child(model, path, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            _set_child(model, path, module.modules_to_save[active[0]] if active else module.original_module)
    model.__dict__.pop(CONFIGS_ATTR, None)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(configs)}")
    merged = [p for p, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:  # checked before any layer forgets the adapter
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge before deleting it (merged in {merged[:3]})")
    remaining_active = [a for a in active_adapters(model) if a != adapter_name]
    for _, layer in adapter_layers(model):
        if holds_adapter(layer, adapter_name):
            layer.delete_adapter(adapter_name)
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            del m.modules_to_save[adapter_name]
    del configs[adapter_name]
    # Every wrapper (also those that never held this adapter) forgets it; as in PEFT, deleting the
    # only active adapter activates the first remaining one.
    if not remaining_active and configs:
        remaining_active = [next(iter(configs))]
    set_adapter(model, remaining_active)
