"""``adapter_batch``: one forward / generate where every sequence picks its own adapter.

Sets the ``mixed_batch`` hook of every LoraLinear (docs/design.md) to a call of
``multi_lora_linear`` over that layer's adapters stacked as [L, r_max, in] / [L, out, r_max].
The stacks are cached per layer and rebuilt only when an adapter changes: the cache key holds
each adapter's name, rank, scaling and its parameters' identity and version counter (bumped by
every in-place write, e.g. ``load_adapter``'s copy_), so stale stacks are never used.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..nn.adapter_layer import AdapterLayer
from ..nn.lora_linear import LoraLinear
from ..nn.modules_to_save import ModulesToSaveWrapper
from ._hook import BASE, run_layer, zeros_lora_B
from .dora_batch import dora_mixed_forward

_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, stack tuple)


def _layer_key(layer: LoraLinear, dtype: torch.dtype):
    parts = [dtype]
    for name in layer.lora_A:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        parts.append((name, layer.r[name], layer.scaling[name], id(a), a._version, id(b), b._version, a.device))
    return tuple(parts)


def layer_stack(layer: LoraLinear, dtype: torch.dtype):
    """(names, lora_A [L, r_max, in], lora_B [L, out, r_max], scalings fp32 [L], ranks int32 [L]) in ``dtype``."""
    key = _layer_key(layer, dtype)
    hit = _STACKS.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    names = list(layer.lora_A)
    dev = layer.base_weight().device
    r_max = max((layer.r[n] for n in names), default=0)
    # Kept across calls: made outside inference mode, so a later forward with grad may save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        a = torch.zeros((len(names), r_max, layer.in_features), dtype=dtype, device=dev)
        b = zeros_lora_B(len(names), layer.out_features, r_max, dtype, dev)
        for i, name in enumerate(names):  # once per adapter change, not per forward
            r = layer.r[name]
            a[i, :r] = layer.lora_A[name].weight.to(dtype)
            b[i, :, :r] = layer.lora_B[name].weight.to(dtype)
        scal = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32, device=dev)
        ranks = torch.tensor([layer.r[n] for n in names], dtype=torch.int32, device=dev)
    stack = (names, a, b, scal, ranks)
    _STACKS[layer] = (key, stack)
    return stack


def loaded_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for m in model.modules():
        if isinstance(m, LoraLinear):
            names.update(dict.fromkeys(m.lora_A))
        elif isinstance(m, AdapterLayer):
            names.update(dict.fromkeys(m.adapter_names()))
    return list(names)


def _check_layer(path: str, layer: LoraLinear, used: set) -> None:
    merged = used.intersection(layer.merged_adapters)
    if merged:
        raise ValueError(f"{path}: adapters {sorted(merged)} are merged into the base weights; "
                         "unmerge them before serving a mixed batch")
    with_bias = sorted(n for n in used if n in layer.lora_B and layer.lora_B[n].bias is not None)
    if with_bias:
        raise NotImplementedError(f"{path}: adapters {with_bias} have lora_bias, which mixed batches do not support")


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]):
    """``with adapter_batch(model, ["a", None, "b"]): model(...)``: sequence i of the batch uses names[i].

    None or "__base__" = the base model. A batch that is a multiple of len(names) (beam search,
    num_return_sequences) repeats each name in place, as PEFT does. Unknown names raise KeyError.
    Works through ``generate`` (every decode step sees the same names). Hooks are restored on exit.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence with one adapter name per sequence, not a string")
    names = [BASE if n is None else n for n in names]
    loaded = loaded_adapters(model)
    unknown = sorted({n for n in names if n != BASE} - set(loaded))
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; loaded: {loaded}")
    used = {n for n in names if n != BASE}
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]
    hooks = []
    for path, layer in layers:
        _check_layer(path, layer, used)
        index = {n: i for i, n in enumerate(layer.lora_A)}  # a layer may lack some adapters: -1 there
        # Valid by construction (indices into this layer's adapters), so layer calls skip the value check.
        seq = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64, device=layer.base_weight().device)
        hooks.append(_make_hook(seq))
    # Embedding / Conv LoRA, LoHa and LoKr layers (nn/kinds.py): the reference path, one pass per name.
    groups = _row_groups(names)
    for path, m in model.named_modules():
        if isinstance(m, AdapterLayer) and m.adapter_names():
            merged = used.intersection(m.merged_adapters)
            if merged:
                raise ValueError(f"{path}: adapters {sorted(merged)} are merged into the base weights; "
                                 "unmerge them before serving a mixed batch")
            layers.append((path, m))
            hooks.append(_adapter_layer_hook(groups))
    # modules_to_save copies (e.g. per-task heads) run once per distinct name on its rows.
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper):
            layers.append(("", m))
            hooks.append(_saved_module_hook(groups))
    previous = [layer.mixed_batch for _, layer in layers]
    try:
        for (_, layer), hook in zip(layers, hooks):
            layer.mixed_batch = hook
        yield model
    finally:
        for (_, layer), prev in zip(layers, previous):
            layer.mixed_batch = prev


def _make_hook(seq_ids: torch.Tensor):
    def hook(layer, x):
        names, a, b, scal, ranks = layer_stack(layer, x.dtype if not torch.is_autocast_enabled(x.device.type)
                                               else torch.get_autocast_dtype(x.device.type))
        if a.shape[0] == 0:
            return layer.base_layer(x)
        if layer.lora_variant:  # DoRA rows: per-row magnitudes (serving/dora_batch.py)
            return dora_mixed_forward(layer, x, names, a, b, scal, ranks, seq_ids)
        return run_layer(layer, x, a, b, scal, ranks, seq_ids)
    return hook


def _rows_per_name(names: list[str], b: int) -> dict:
    if b % len(names):
        raise ValueError(f"the batch has {b} sequences but {len(names)} adapter names were given")
    per_row = [n for n in names for _ in range(b // len(names))]
    return {name: [i for i, n in enumerate(per_row) if n == name] for name in dict.fromkeys(per_row)}


def _row_groups(names: list[str]):
    """(batch size, device) -> [(name, row index tensor)] for these names, built once per batch size and
    device and shared by every per-name hook of one ``adapter_batch`` (not rebuilt per layer call). Made
    outside inference mode, like the stacks: a later forward with grad saves them for backward."""
    cache: dict = {}

    def groups(b: int, device) -> list:
        hit = cache.get((b, device))
        if hit is None:
            with torch.inference_mode(False):
                hit = cache[(b, device)] = [(name, torch.tensor(rows, device=device))
                                            for name, rows in _rows_per_name(names, b).items()]
        return hit
    return groups


def _adapter_layer_hook(groups):
    """An AdapterLayer's mixed batch: the base on every row, each adapter's term added on its rows only
    (batch dimension first, as the modules_to_save hook assumes)."""
    def hook(layer: AdapterLayer, x, *args, **kwargs):
        out = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters:
            return out
        for name, idx in groups(x.shape[0], x.device):
            if name == BASE or not layer.has_adapter(name):
                continue
            delta = layer.adapter_forward(name, x.index_select(0, idx))
            if delta is not None:
                out = out.index_add(0, idx, delta.to(out.dtype))
        return out
    return hook


def _saved_module_hook(groups):
    """Rows of each name through that adapter's copy of the module (the original for base rows)."""
    def hook(wrapper: ModulesToSaveWrapper, x, *args, **kwargs):
        b = x.shape[0]
        out = None
        for name, rows in groups(b, x.device):
            module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
            part = module(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = part.new_empty((b, *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out
    return hook


def mixed_batch_check(model: nn.Module, names: Sequence[Optional[str]], inputs: dict, atol: float = 1e-4) -> dict:
    """Compare a mixed batch with running each sequence alone under its own adapter (the demo's check).

    ``inputs``: model kwargs with batch dim 0 (e.g. input_ids, attention_mask); the model returns
    ``.logits``. The per-sequence runs switch each LoraLinear's ``active_adapters`` directly and restore
    them (no change to which parameters are trainable). Returns {"max_abs_diff": float, "ok": bool}.
    """
    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, AdapterLayer, ModulesToSaveWrapper))]
    saved = [(m.active_adapters, m.disable_adapters) for m in layers]
    with torch.no_grad(), adapter_batch(model, names):
        mixed = model(**inputs).logits
    worst = 0.0
    try:
        with torch.no_grad():
            for i, name in enumerate(names):
                base = name in (None, BASE)
                for m in layers:
                    held = m.lora_A if isinstance(m, LoraLinear) else (
                        m.adapter_names() if isinstance(m, AdapterLayer) else m.modules_to_save)
                    m.active_adapters = [] if base or name not in held else [name]
                    m.disable_adapters = False
                alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
                worst = max(worst, float((alone - mixed[i:i + 1]).abs().max()))
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m.active_adapters, m.disable_adapters = active, disabled
    return {"max_abs_diff": worst, "ok": worst <= atol}
