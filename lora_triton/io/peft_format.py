"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Disk keys are ``base_model.model.<module path>.lora_A.weight`` etc. (no adapter name); ours carry
the adapter name (``<path>.lora_A.<name>.weight``), as PEFT's in-memory names do. Loading checks the
whole file against the model before it changes anything, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME, LoraConfig
from ..nn import kinds
from ..nn.inject import _check_name, adapter_configs, adapter_layers, inject_lora, set_adapter
from ..nn.lora_linear import LoraLinear
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..nn.targets import candidate_modules, find_targets, resolve_targets
from ..nn.transaction import model_transaction
from .adapter_files import WEIGHTS_NAME, torn_config, write_pair

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"


def _adapter_dir(directory: str, adapter_name: str) -> str:
    """PEFT saves non-default adapters to <dir>/<name>/; accept both layouts."""
    for folder in (directory, os.path.join(directory, adapter_name)):
        # A first save into an empty folder, killed after its commit point, has no config file yet.
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)) or torn_config(folder) is not None:
            return folder
    nested = os.path.join(directory, adapter_name)
    raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r} (nor in {nested!r})")


def check_adapter_name(adapter_name) -> None:
    """An adapter name is also a folder name (PEFT's <dir>/<name>/ layout): one plain path component."""
    _check_name(adapter_name)
    if os.path.isabs(adapter_name) or any(sep in adapter_name for sep in ("/", "\\", "\0", os.sep)):
        raise ValueError(f"adapter_name must be a single path component (no '/', '\\', NUL, not absolute), "
                         f"got {adapter_name!r}")


def read_peft_adapter(directory: str, adapter_name: str = "default") -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and the raw tensors (PEFT keys) of an adapter directory; pickle files are refused."""
    check_adapter_name(adapter_name)
    folder = _adapter_dir(directory, adapter_name)
    recorded = torn_config(folder)
    if recorded is not None:
        warnings.warn(f"{folder}: an interrupted save left {CONFIG_NAME} older than {WEIGHTS_NAME}; using the "
                      "config saved with the weights (the next save_adapter completes the pair)", stacklevel=2)
        config = kinds.config_from_dict(recorded)  # the config class of the file's peft_type
    else:
        config = kinds.read_config(folder)
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise ValueError(f"{folder} holds adapter_model.bin (pickle); lora_triton loads safetensors only. "
                             "Convert it once with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir)")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    return config, tensors


def _bias_params(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    if getattr(config, "bias", "none") == "none":
        return {}
    if config.bias == "lora_only":
        return {f"{p}.base_layer.bias": layer.base_layer.bias for p, layer in adapter_layers(model)
                if kinds.holds_adapter(layer, adapter_name) and getattr(layer.base_layer, "bias", None) is not None}
    return {k: v for k, v in model.named_parameters()
            if k.endswith(".bias") and ".lora_" not in k and ".modules_to_save." not in k
            and ".original_module." not in k}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of one adapter (no adapter name in the keys)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(configs)}")
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if not isinstance(layer, LoraLinear):
            if layer.has_adapter(adapter_name):  # other kinds / layer types (nn/kinds.py): their own key names
                for suffix, tensor in layer.adapter_tensors(adapter_name).items():
                    out[f"{PREFIX}{path}.{suffix}"] = tensor
            continue
        if adapter_name not in layer.lora_A:
            continue
        out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if layer.lora_B[adapter_name].bias is not None:
            out[f"{PREFIX}{path}.lora_B.bias"] = layer.lora_B[adapter_name].bias
        if adapter_name in layer.lora_magnitude_vector:  # DoRA: PEFT's key has no ".weight"
            out[f"{PREFIX}{path}.{MAGNITUDE}"] = layer.lora_magnitude_vector[adapter_name].weight
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k, v in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    for k, v in _bias_params(model, configs[adapter_name], adapter_name).items():
        out[f"{PREFIX}{k}"] = v
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def saved_base_model_name(model: nn.Module, config) -> Optional[str]:
    """The base_model_name_or_path every adapter save (LoRA / DoRA, LyCORIS, AdaLoRA) writes: the model's name
    (a transformers model's ``name_or_path``; PEFT's ``get_peft_model`` sets the config to it, and its save
    writes that), else the config's own value (a loaded adapter's, which PEFT's save keeps), else None."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name:
        return name
    return config.base_model_name_or_path or None


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default",
                 tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write one adapter to ``directory`` in PEFT's format, as one atomic save (``io/adapter_files.py``):
    after a crash at any point the directory loads as the old adapter or the new one, never a mix.

    ``tensors``: PEFT-keyed values to write instead of the model's own (e.g. gathered from shards).
    AdaLoRA adapters go to ``io.adalora_format.save_adalora`` (tensors sliced by rank_pattern)."""
    if tensors is None and getattr(adapter_configs(model).get(adapter_name), "peft_type", None) == "ADALORA":
        from .adalora_format import save_adalora

        return save_adalora(model, directory, adapter_name)
    tensors = adapter_state_dict(model, adapter_name) if tensors is None else tensors
    write_adapter(model, directory, adapter_name, tensors)


def write_adapter(model: nn.Module, directory: str, adapter_name: str, tensors: dict[str, torch.Tensor],
                  **config_changes) -> None:
    """``tensors`` and the adapter's config as one atomic save (every adapter save ends here): the config's
    base_model_name_or_path by ``saved_base_model_name``, plus ``config_changes``."""
    config = adapter_configs(model)[adapter_name]
    config = dataclasses.replace(config, base_model_name_or_path=saved_base_model_name(model, config),
                                 **config_changes)
    write_pair(directory, lambda tmp, metadata: save_file(tensors, tmp, metadata=metadata), config.to_json_string())


def _plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str):
    """Check every key, shape and dtype against the model as it will be after injection; changes nothing.

    Returns (resolved config, {module path: {suffix: tensor}}, [(locator, value)]) where a locator
    is the tensor object to write (it survives wrapping) or ("saved", wrapper path, key inside the
    module) for the adapter's modules_to_save copy, which injection creates.
    """
    resolved = resolve_targets(model, config)
    targets = dict(find_targets(model, resolved))
    modules = dict(model.named_modules())
    lora: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    generic = _plan_generic(resolved, targets, tensors)  # Embedding / Conv LoRA, LoHa, LoKr (nn/kinds.py)
    lora_suffixes = ("lora_A.weight", "lora_B.weight", "lora_B.bias", MAGNITUDE) \
        if isinstance(resolved, LoraConfig) else ()
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r}: PEFT keys start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        if any(rest.startswith(p + ".") and rest[len(p) + 1:] in parts for p, parts in generic.items()):
            continue
        for suffix in lora_suffixes:
            if rest.endswith("." + suffix):
                lora.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            plain[rest] = value
    for path, parts in lora.items():
        if path not in targets:
            where = "the model has no module" if path not in modules else "the config does not target module"
            raise ValueError(f"adapter weights for {path!r}, but {where} {path!r} "
                             f"(target_modules={config.target_modules!r})")
        module = targets[path]
        in_f, out_f = (module.in_features, module.out_features) if isinstance(module, LoraLinear) else (
            (module.weight.shape[0], module.weight.shape[1]) if type(module).__name__ == "Conv1D"
            else (module.in_features, module.out_features))
        r = resolved.rank_for(path)
        dims = {"lora_A.weight": (("rank", r), ("in_features", in_f)),
                "lora_B.weight": (("out_features", out_f), ("rank", r)),
                "lora_B.bias": (("out_features", out_f),)}
        for suffix, named in dims.items():
            shape = tuple(size for _, size in named)
            if suffix not in parts:
                if suffix == "lora_B.bias":
                    continue
                raise ValueError(f"missing key {PREFIX}{path}.{suffix} (expected shape {shape})")
            _check_tensor(f"{PREFIX}{path}.{suffix}", parts[suffix], named)
        _check_magnitude(path, parts, out_f, resolved.use_dora)
        if ("lora_B.bias" in parts) != bool(resolved.lora_bias):
            raise ValueError(f"{PREFIX}{path}.lora_B.bias presence disagrees with lora_bias={resolved.lora_bias}")
    missing = sorted(set(targets) - set(lora) - set(generic))
    if missing:
        raise ValueError(f"missing adapter weights for targeted modules {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (keys {PREFIX}<module>.lora_A.weight)")
    for rest in list(plain):
        # bias="all" makes PEFT also write the bias of each modules_to_save copy and original
        # (`<m>.modules_to_save.bias`, `<m>.original_module.bias`); PEFT's loader ignores them too.
        if any(re.match(rf"(.*\.)?{re.escape(m)}\.(modules_to_save|original_module)\.", rest)
               for m in resolved.modules_to_save or ()):
            del plain[rest]
    saved = _saved_paths(model, resolved)
    steps = []
    for rest, value in plain.items():
        locator, target = _plain_target(model, targets, saved, rest)
        if target is None:
            raise ValueError(f"unexpected key {PREFIX}{rest}: no such parameter or buffer in the model")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{PREFIX}{rest}: shape {tuple(value.shape)} in the file, model has {tuple(target.shape)}")
        if value.is_floating_point() != target.is_floating_point() or value.is_complex():
            raise ValueError(f"{PREFIX}{rest}: dtype {value.dtype} in the file, model has {target.dtype}")
        steps.append((locator, value))
    lora.update(generic)
    return resolved, lora, steps


def _plan_generic(config, targets: dict, tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Keys of the targets that are not LoRA-on-Linear (nn/kinds.py layer types): path -> {suffix: tensor},
    every suffix and shape checked against what the layer type expects."""
    kind = kinds.kind_of(config)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, module in targets.items():
        lt = kinds.check_target(config, module, path)
        if lt is kinds.LORA_LINEAR:
            continue
        base = module.base_layer if kinds.is_adapter_layer(module) else module
        expected = lt.shapes(base, config, path)
        parts = {}
        for suffix, shape in expected.items():
            key = f"{PREFIX}{path}.{suffix}"
            if key not in tensors:
                raise ValueError(f"missing key {key} (expected shape {shape} for a {kind.peft_type} adapter on "
                                 f"this {type(base).__name__})")
            got = tuple(tensors[key].shape)
            if got != tuple(shape):
                raise ValueError(f"{key}: shape {got} in the file, expected {tuple(shape)} for a {kind.peft_type} "
                                 f"adapter on this {type(base).__name__} (rank, kernel size or factorisation "
                                 "disagrees with the config)")
            if not tensors[key].is_floating_point():
                raise ValueError(f"{key}: dtype {tensors[key].dtype} in the file, expected a floating point tensor")
            parts[suffix] = tensors[key]
        heads = _adapter_key_heads(kind)
        stray = sorted(k for k in tensors if k.startswith(f"{PREFIX}{path}.")
                       and k[len(PREFIX) + len(path) + 1:].split(".")[0] in heads
                       and k[len(PREFIX) + len(path) + 1:] not in expected)
        if stray:
            raise ValueError(f"unexpected keys {stray[:3]} for module {path!r}: this config makes it hold "
                             f"{sorted(expected)}")
        out[path] = parts
    return out


def _adapter_key_heads(kind) -> set[str]:
    heads = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", MAGNITUDE}
    return heads | {a for lt in kind.layer_types for a in getattr(lt.layer_class, "param_dicts", ())}


def _check_magnitude(path: str, parts: dict, out_features: int, use_dora: bool) -> None:
    """DoRA's ``lora_magnitude_vector`` [out]: present exactly when the config says use_dora."""
    if (MAGNITUDE in parts) != bool(use_dora):
        state = "missing" if use_dora else "present"
        raise ValueError(f"{PREFIX}{path}.{MAGNITUDE} is {state} but the config has use_dora={use_dora}")
    if use_dora:
        _check_tensor(f"{PREFIX}{path}.{MAGNITUDE}", parts[MAGNITUDE], (("out_features", out_features),))


def _check_tensor(key: str, value: torch.Tensor, named) -> None:
    """Shape and dtype of one LoRA tensor; the error names the dimension that differs."""
    shape = tuple(size for _, size in named)
    got = tuple(value.shape)
    if len(got) != len(shape):
        raise ValueError(f"{key}: shape {got} in the file, expected {shape} ({len(shape)}-D)")
    for i, ((what, size), have) in enumerate(zip(named, got)):
        if have != size:
            why = (f"rank disagrees with the config's r / rank_pattern ({size})" if what == "rank"
                   else f"the module's {what} is {size}")
            raise ValueError(f"{key}: shape {got} in the file, expected {shape}: dim {i} is {have}, but {why}")
    if not value.is_floating_point():
        raise ValueError(f"{key}: dtype {value.dtype} in the file, expected a floating point tensor")


def _saved_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths that are or will be ModulesToSaveWrappers after injection (inject_lora's suffix rule)."""
    return [path for path, m in candidate_modules(model) if path and (
        isinstance(m, ModulesToSaveWrapper) or any(path.endswith(s) for s in config.modules_to_save or ()))]


def _plain_target(model: nn.Module, targets: dict, saved: list[str], rest: str):
    """(locator, tensor now) for a non-LoRA key, named as after injection; (None, None) if there is none."""
    for path in saved:
        if rest.startswith(path + "."):
            module = model.get_submodule(path)
            inner = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            sub = rest[len(path) + 1:]
            return ("saved", path, sub), inner.state_dict(keep_vars=True).get(sub)
    owner = next((p for p in targets if rest.startswith(p + ".")), None)
    if owner is not None:
        # A targeted module is wrapped: its own tensors become `<path>.base_layer.<name>`.
        sub = rest[len(owner) + 1:]
        if not sub.startswith("base_layer."):
            raise ValueError(f"unexpected key {PREFIX}{rest}: {owner!r} is targeted, so its tensors are named "
                             f"{owner}.base_layer.<name> after injection (adapter files carry no base weights)")
        module = targets[owner]
        base = module.base_layer if kinds.is_adapter_layer(module) else module
        target = base.state_dict(keep_vars=True).get(sub[len("base_layer."):])
        return target, target
    target = model.state_dict(keep_vars=True).get(rest)
    return target, target


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False,
                 config: Optional[LoraConfig] = None) -> nn.Module:
    """Load a PEFT-format adapter into ``model`` (injecting LoRA layers as needed) under ``adapter_name``.

    Transactional: every key, shape and dtype is checked first, and any exception after that (even
    KeyboardInterrupt) rolls the model back, so a failed load leaves it bit-identical.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; loaded: {sorted(adapter_configs(model))}")
    if config is not None:
        config = kinds.coerce_config(config)  # ours (LoRA / LoHa / LoKr) or PEFT's LoraConfig; else a TypeError
    file_config, tensors = read_peft_adapter(directory, adapter_name)
    config = config or file_config
    config.validate()
    resolved, lora, steps = _plan_load(model, config, tensors, adapter_name)
    with model_transaction(model) as tx, torch.no_grad():
        inject_lora(model, dataclasses.replace(kinds.without_init(resolved), inference_mode=not is_trainable),
                    adapter_name)
        adapter_configs(model)[adapter_name] = dataclasses.replace(resolved, inference_mode=not is_trainable)
        layers = dict(adapter_layers(model))
        for path, parts in lora.items():  # fresh parameters: a rollback drops them
            layer = layers[path]
            if not isinstance(layer, LoraLinear):
                own = layer.adapter_tensors(adapter_name)
                for suffix, value in parts.items():
                    own[suffix].copy_(value)
                continue
            layer.lora_A[adapter_name].weight.copy_(parts["lora_A.weight"])
            layer.lora_B[adapter_name].weight.copy_(parts["lora_B.weight"])
            if "lora_B.bias" in parts:
                layer.lora_B[adapter_name].bias.copy_(parts["lora_B.bias"])
            if MAGNITUDE in parts:
                layer.lora_magnitude_vector[adapter_name].weight.copy_(parts[MAGNITUDE])
        for locator, value in steps:
            if isinstance(locator, tuple):  # the adapter's new modules_to_save copy
                _, path, sub = locator
                model.get_submodule(path).modules_to_save[adapter_name].state_dict(keep_vars=True)[sub].copy_(value)
            else:  # a tensor the model had before: its old value is kept for a rollback
                tx.write(locator, value)
        if not is_trainable:
            for _, layer in adapter_layers(model):
                if kinds.holds_adapter(layer, adapter_name):
                    for p in kinds.adapter_parameters(layer, adapter_name):
                        p.requires_grad_(False)
        else:
            set_adapter(model, adapter_name)
    return model
