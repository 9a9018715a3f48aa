"""The seam for adapter kinds and layer types.

An *adapter kind* is what PEFT calls a ``peft_type`` (LORA, LOHA, LOKR): a config class, and for
each *layer type* it supports (Linear, Embedding, Conv...) a layer class that wraps such a base
module. ``inject_lora``, ``load_adapter``, ``save_adapter`` and ``read_peft_adapter`` only talk to this
registry: adding a kind (or a layer type of a kind) is one ``register`` call, never a new branch in
``LoraLinear`` or in the model-level code.

A layer type is a ``LayerType``: ``matches(base)`` says whether it wraps a base module, ``wrap`` builds
the wrapper around a base with a first adapter, ``add`` adds a further adapter to an existing wrapper,
``shapes`` gives the disk key suffixes and shapes an adapter of this config has on that base (checked
before any load changes the model), ``tensors(layer, name)`` maps those suffixes to the parameters.
Every wrapper keeps ``base_layer``, ``active_adapters``, ``disable_adapters``, ``merged_adapters``,
``merge``, ``unmerge``, ``_merged_values`` and ``delete_adapter`` (``AdapterLayer`` provides them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import LoraConfig, as_lora_config, load_config_json
from ..config_lycoris import LoHaConfig, LoKrConfig
from .adapter_layer import AdapterLayer
from .dora_layers import dora_shapes
from .loha import LOHA_BASES, LoHaLayer
from .lokr import LOKR_BASES, LoKrLayer
from .lora_conv import CONV_TYPES, LoraConv
from .lora_embedding import LoraEmbedding
from .lora_linear import LoraLinear, is_supported_base, linear_features


@dataclass(frozen=True)
class LayerType:
    name: str
    matches: Callable[[nn.Module], bool]
    layer_class: type
    wrap: Callable[[nn.Module, str, Any, str], nn.Module]
    add: Callable[[nn.Module, str, Any, str], None]
    shapes: Callable[[nn.Module, Any, str], dict]
    tensors: Callable[[nn.Module, str], dict]


@dataclass(frozen=True)
class AdapterKind:
    peft_type: str
    config_class: type
    layer_types: tuple[LayerType, ...]

    def layer_type_for(self, module: nn.Module):
        """The layer type that wraps ``module`` (a base module or an existing wrapper), or None."""
        base = module.base_layer if is_adapter_layer(module) else module
        for lt in self.layer_types:
            if lt.matches(base) and (base is module or isinstance(module, lt.layer_class)):
                return lt
        return None

    def supported(self) -> str:
        return ", ".join(lt.name for lt in self.layer_types)


KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> None:
    KINDS[kind.peft_type] = kind


def kind_of(config) -> AdapterKind:
    for kind in KINDS.values():
        if type(config) is kind.config_class:
            return kind
    names = ", ".join(k.config_class.__name__ for k in KINDS.values())
    raise TypeError(f"config must be one of lora_triton's {names}, got {type(config).__name__}")


def coerce_config(config):
    """``config`` if it is one of the registered config classes; PEFT's LoraConfig converted to ours
    (``config.as_lora_config``); anything else a TypeError naming the accepted classes."""
    if any(type(config) is kind.config_class for kind in KINDS.values()):
        return config
    try:
        return as_lora_config(config)
    except TypeError:
        others = ", ".join(k.config_class.__name__ for k in KINDS.values() if k.config_class is not LoraConfig)
        raise TypeError(f"config must be one of lora_triton's {others}, a lora_triton.LoraConfig or a "
                        f"peft.LoraConfig, got {type(config).__name__}") from None


def layer_classes() -> tuple[type, ...]:
    return (LoraLinear, AdapterLayer)


def is_adapter_layer(module: nn.Module) -> bool:
    return isinstance(module, (LoraLinear, AdapterLayer))


def holds_adapter(layer: nn.Module, name: str) -> bool:
    return name in layer.lora_A if isinstance(layer, LoraLinear) else layer.has_adapter(name)


def adapter_parameters(layer: nn.Module, name: str) -> list:
    if isinstance(layer, LoraLinear):
        return list(_lora_linear_tensors(layer, name).values())
    return layer.adapter_parameters(name)


def check_target(config, module: nn.Module, path: str) -> LayerType:
    """The layer type that takes a ``config`` adapter on ``module``, or a TypeError saying why none does."""
    kind = kind_of(config)
    lt = kind.layer_type_for(module)
    if lt is not None:
        return lt
    if is_adapter_layer(module):
        raise TypeError(f"module {path!r} already holds adapters of another kind ({type(module).__name__}); "
                        f"a {kind.peft_type} adapter cannot share it (one kind per module, as in PEFT)")
    raise TypeError(f"target module {path!r} is a {type(module).__name__}; {kind.peft_type} adapters in "
                    f"lora_triton support {kind.supported()}")


def attach(module: nn.Module, adapter_name: str, config, path: str) -> nn.Module:
    """Add ``adapter_name`` to ``module``: returns the wrapper (``module`` itself if it already was one)."""
    lt = check_target(config, module, path)
    if is_adapter_layer(module):
        lt.add(module, adapter_name, config, path)
        return module
    return lt.wrap(module, adapter_name, config, path)


def config_from_dict(data: dict):
    """The config object for an adapter_config.json dict, by its ``peft_type`` (default LORA)."""
    peft_type = data.get("peft_type") or "LORA"
    kind = KINDS.get(getattr(peft_type, "value", peft_type))
    if kind is None:
        raise NotImplementedError(f"peft_type {peft_type!r} is not supported by lora_triton "
                                  f"(supported: {sorted(KINDS)})")
    return kind.config_class.from_dict(data)


def read_config(directory: str):
    return config_from_dict(load_config_json(directory))


def without_init(config):
    """The config to inject with before a load overwrites every adapter tensor."""
    import dataclasses

    field = "init_lora_weights" if isinstance(config, LoraConfig) else "init_weights"
    return dataclasses.replace(config, **{field: False})


# -- LORA ---------------------------------------------------------------------------------------
def _lora_linear_tensors(layer: LoraLinear, name: str) -> dict:
    out = {"lora_A.weight": layer.lora_A[name].weight, "lora_B.weight": layer.lora_B[name].weight}
    if layer.lora_B[name].bias is not None:
        out["lora_B.bias"] = layer.lora_B[name].bias
    if name in layer.lora_magnitude_vector:  # DoRA: PEFT's key has no ".weight"
        out["lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
    return out


def _linear_args(c: LoraConfig, path: str) -> tuple:
    return (c.rank_for(path), c.alpha_for(path), c.lora_dropout, c.use_rslora, c.init_lora_weights, c.lora_bias)


def _linear_shapes(base, c: LoraConfig, path: str) -> dict:
    r = c.rank_for(path)
    in_f, out_f = linear_features(base)
    shapes = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
    if c.lora_bias:
        shapes["lora_B.bias"] = (out_f,)
    return shapes


def _embedding_args(c: LoraConfig, path: str) -> tuple:
    return (c.rank_for(path), c.alpha_for(path), c.use_rslora, c.init_lora_weights, c.lora_bias, c.use_dora)


def _conv_args(c: LoraConfig, path: str) -> tuple:
    return _linear_args(c, path) + (c.use_dora,)


LORA_LINEAR = LayerType(
    "nn.Linear / transformers Conv1D", is_supported_base, LoraLinear,
    wrap=lambda base, n, c, p: LoraLinear(base, n, *_linear_args(c, p), use_dora=c.use_dora),
    add=lambda layer, n, c, p: layer.add_adapter(n, *_linear_args(c, p), use_dora=c.use_dora),
    shapes=_linear_shapes, tensors=_lora_linear_tensors)


def adapter_layer_type(name: str, matches: Callable[[nn.Module], bool], layer_class: type,
                       args: Callable[[Any, str], tuple], shapes: Callable[[nn.Module, Any, str], dict]) -> LayerType:
    """A LayerType for an ``AdapterLayer`` subclass built as ``layer_class(base, name, *args(config, path))``
    and extended with ``layer.add_adapter(name, *args(config, path))``."""
    return LayerType(name, matches, layer_class, wrap=lambda base, n, c, p: layer_class(base, n, *args(c, p)),
                     add=lambda layer, n, c, p: layer.add_adapter(n, *args(c, p)), shapes=shapes,
                     tensors=lambda layer, n: layer.adapter_tensors(n))


LORA_EMBEDDING = adapter_layer_type(
    "nn.Embedding", lambda m: isinstance(m, nn.Embedding), LoraEmbedding, _embedding_args,
    shapes=lambda base, c, p: {**LoraEmbedding.adapter_shapes(base, c.rank_for(p)), **dora_shapes(base, c.use_dora)})
LORA_CONV = adapter_layer_type(
    "nn.Conv1d/2d/3d", lambda m: type(m) in CONV_TYPES, LoraConv, _conv_args,
    shapes=lambda base, c, p: {**LoraConv.adapter_shapes(base, c.rank_for(p), c.lora_bias),
                               **dora_shapes(base, c.use_dora)})

register(AdapterKind("LORA", LoraConfig, (LORA_LINEAR, LORA_EMBEDDING, LORA_CONV)))


# -- LOHA / LOKR ---------------------------------------------------------------------------------
def _loha_args(c: LoHaConfig, path: str) -> tuple:
    return (c.rank_for(path), c.alpha_for(path), c.rank_dropout, c.module_dropout, c.use_effective_conv2d,
            c.init_weights)


def _lokr_args(c: LoKrConfig, path: str) -> tuple:
    return (c.rank_for(path), c.alpha_for(path), c.rank_dropout, c.module_dropout, c.use_effective_conv2d,
            c.decompose_both, c.decompose_factor, c.rank_dropout_scale, c.init_weights)


LOHA_LAYERS = adapter_layer_type(
    "nn.Linear / nn.Conv1d / nn.Conv2d", lambda m: type(m) in LOHA_BASES, LoHaLayer, _loha_args,
    shapes=lambda base, c, p: LoHaLayer.adapter_shapes(base, c.rank_for(p), c.use_effective_conv2d))
LOKR_LAYERS = adapter_layer_type(
    "nn.Linear / nn.Conv1d / nn.Conv2d", lambda m: type(m) in LOKR_BASES, LoKrLayer, _lokr_args,
    shapes=lambda base, c, p: LoKrLayer.adapter_shapes(base, c.rank_for(p), c.use_effective_conv2d,
                                                       c.decompose_both, c.decompose_factor))

register(AdapterKind("LOHA", LoHaConfig, (LOHA_LAYERS,)))
register(AdapterKind("LOKR", LoKrConfig, (LOKR_LAYERS,)))
