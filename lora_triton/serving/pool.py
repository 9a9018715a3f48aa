"""``AdapterPool``: many adapters over one base model through a fixed set of device slots.

Per targeted layer the pool preallocates A [slots, max_rank, in] and B [slots, out, max_rank]
(the base weight's dtype and device), plus per-slot ranks and scalings. An adapter is parsed,
checked and hashed on the host, kept as a CPU copy, and written into a slot when it is loaded
or when a batch needs it; the least recently used unpinned slot is evicted to make room (its
CPU copy stays, so a later batch reloads it). Rank-0 slots (an adapter that skips a layer)
cost nothing: the kernels loop over rank tiles only up to each slot's rank.

Thread safety: one re-entrant lock guards the slot table and buffers. ``batch`` holds it from
making its adapters resident until the forward ends, so a load / unload / eviction from another
thread waits and can never rewrite a slot a running forward reads. Loads parse, cast and hash
outside the lock; only the slot writes take it. Identity is the sha256 of the adapter's tensors
and scalings: loading changed weights under a known name replaces them, identical ones are a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..config import LoraConfig
from ..nn.lora_linear import LoraLinear, is_supported_base
from ..nn.targets import find_targets, resolve_targets
from ._hook import BASE, run_layer, zeros_lora_B
from .dora_batch import dora_scale_row, scaled_mixed_forward

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"


@dataclass
class _Adapter:
    name: str
    layers: dict  # layer path -> (A [r, in], B [out, r], scaling), CPU, pool dtype
    digest: str
    pinned: bool = False
    slot: Optional[int] = None
    last_used: int = 0
    extra: dict = field(default_factory=dict)


def _read_peft_dir(directory: str):
    try:  # the lead's reader (config validation, pickle refusal); a minimal fallback otherwise
        from ..io.peft_format import read_peft_adapter
    except ImportError:  # pragma: no cover
        from safetensors.torch import load_file
        return LoraConfig.from_pretrained(directory), load_file(os.path.join(directory, "adapter_model.safetensors"))
    return read_peft_adapter(directory)


def _digest(layers: dict, dora: Optional[dict] = None) -> str:
    h = hashlib.sha256()
    for path in sorted(dora or {}):  # DoRA: the per-row scales depend on the magnitudes too
        h.update(f"dora|{path}".encode() + dora[path].contiguous().view(torch.uint8).numpy().tobytes())
    for path in sorted(layers):
        a, b, s = layers[path]
        h.update(f"{path}|{tuple(a.shape)}|{tuple(b.shape)}|{a.dtype}|{float(s)!r}".encode())
        for t in (a, b):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class AdapterPool:
    """Serve many adapters over ``model`` with ``num_slots`` resident ones of rank <= ``max_rank``.

    Layers: the model's LoraLinear layers, or, with ``target_modules`` (PEFT's matching rules),
    those modules wrapped in adapter-less LoraLinear layers by the pool.
    """

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, device=None,
                 target_modules: Optional[Union[list[str], str]] = None):
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if not isinstance(max_rank, int) or max_rank <= 0:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        self.model, self.num_slots, self.max_rank = model, num_slots, max_rank
        if target_modules is not None:
            self._wrap(target_modules)
        self.layers = {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear)}
        if not self.layers:
            raise ValueError("the model has no LoraLinear layers: pass target_modules=[...] or inject_lora first")
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        self._adapters: dict[str, _Adapter] = {}
        self._slots: list[Optional[str]] = [None] * num_slots
        self._busy: list[set] = []  # slot sets of the batches running on this thread's lock
        self._buffers = {}
        self._dora: dict[str, torch.Tensor] = {}  # path -> (g - 1) [slots + 1, out] once a DoRA adapter is written
        for path, layer in self.layers.items():
            w = layer.base_weight()
            dev = torch.device(device) if device is not None else w.device
            self._buffers[path] = (
                torch.zeros((num_slots, max_rank, layer.in_features), dtype=w.dtype, device=dev),
                zeros_lora_B(num_slots, layer.out_features, max_rank, w.dtype, dev),
                torch.zeros(num_slots, dtype=torch.float32, device=dev),
                torch.zeros(num_slots, dtype=torch.int32, device=dev))
        self.device = next(iter(self._buffers.values()))[0].device

    def _wrap(self, target_modules) -> None:
        config = resolve_targets(self.model, LoraConfig(target_modules=target_modules))
        targets = find_targets(self.model, config)
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} matched no module")
        for path, module in targets:
            if isinstance(module, LoraLinear):
                continue
            if not is_supported_base(module):
                raise TypeError(f"target {path!r} is a {type(module).__name__}, not a Linear / Conv1D")
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, attr, LoraLinear(module, adapter_name=None))

    # -- parsing (no lock) ---------------------------------------------------------------------
    def _parse(self, name: str, config: LoraConfig, tensors: dict) -> dict:
        if config.lora_bias:
            raise NotImplementedError(f"adapter {name!r} has lora_bias, which the pool does not serve")
        if config.modules_to_save:
            raise NotImplementedError(f"adapter {name!r} has modules_to_save, which the pool does not serve")
        modules = dict(self.model.named_modules())
        parts: dict[str, dict] = {}
        for key, value in tensors.items():
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix in ("lora_A.weight", "lora_B.weight") + ((MAGNITUDE,) if config.use_dora else ()):
                if rest.endswith("." + suffix):
                    parts.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
                    break
            else:
                raise ValueError(f"adapter {name!r}: unsupported key {key!r} (the pool serves lora_A / lora_B only)")
        layers = {}
        for path, pair in parts.items():
            if path not in self.layers:
                why = "the base model has no module" if path not in modules else "the pool does not target module"
                raise ValueError(f"adapter {name!r} targets {path!r}, but {why} {path!r}; "
                                 f"pool layers: {sorted(self.layers)[:6]}...")
            if set(pair) != {"lora_A.weight", "lora_B.weight"} | ({MAGNITUDE} if config.use_dora else set()):
                raise ValueError(f"adapter {name!r}: {path!r} needs lora_A.weight and lora_B.weight"
                                 + (f" and {MAGNITUDE} (use_dora)" if config.use_dora else ""))
            layer, a, b = self.layers[path], pair["lora_A.weight"], pair["lora_B.weight"]
            r = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer.in_features or \
                    tuple(b.shape) != (layer.out_features, r):
                raise ValueError(f"adapter {name!r}, {path!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                 f"do not fit [r, {layer.in_features}] / [{layer.out_features}, r]")
            if r > self.max_rank:
                raise ValueError(f"adapter {name!r}: rank {r} at {path!r} exceeds the pool's max_rank={self.max_rank}")
            if r != config.rank_for(path):
                raise ValueError(f"adapter {name!r}, {path!r}: rank {r} in the tensors, "
                                 f"{config.rank_for(path)} in the config (r / rank_pattern)")
            dtype = self._buffers[path][0].dtype
            layers[path] = (a.detach().to("cpu", dtype).contiguous(), b.detach().to("cpu", dtype).contiguous(),
                            float(config.scaling_for(path)))
        if not layers:
            raise ValueError(f"adapter {name!r} holds no LoRA weights")
        return layers

    # -- public API ----------------------------------------------------------------------------
    def load(self, name: str, source: Union[str, os.PathLike, dict], config: Optional[LoraConfig] = None,
             pin: bool = False) -> str:
        """Load a PEFT directory, or a state dict (PEFT keys) with its LoraConfig, into a slot. Returns the sha256.

        A name already loaded with identical content is only touched; different content replaces it.
        """
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if isinstance(source, (str, os.PathLike)):
            file_config, tensors = _read_peft_dir(os.fspath(source))
            config = config or file_config
        else:
            tensors = source
            if config is None:
                raise ValueError("loading from a state dict needs its LoraConfig (config=...)")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lora_triton.LoraConfig, got {type(config).__name__}")
        config.validate()  # fields may have been changed since construction (e.g. a NaN lora_alpha)
        layers = self._parse(name, config, tensors)
        dora = self._dora_rows(name, config, tensors, layers) if config.use_dora else {}
        digest = _digest(layers, dora)
        # A failed load changes nothing: the slot is chosen (or "no slot" raised) before any write.
        with self._lock:
            old = self._adapters.get(name)
            if old is not None and old.digest == digest:
                self._ensure_resident([name])
                old.pinned = old.pinned or pin
                return digest
            if old is not None and old.slot is not None and any(old.slot in s for s in self._busy):
                raise RuntimeError(f"adapter {name!r} is in use by a running batch; cannot replace it now")
            slot = old.slot if old is not None and old.slot is not None else self._pick_slot(name, {name})
            # New content under a pinned name stays pinned: unpinning is only ever explicit.
            entry = _Adapter(name, layers, digest, pinned=pin or (old is not None and old.pinned), extra={"dora": dora})
            entry.last_used = next(self._clock)
            occupant = self._slots[slot]
            if occupant is not None and occupant != name:
                self._free(self._adapters[occupant])  # evicted to its CPU copy
            if old is not None:
                old.slot = None
            self._write(entry, slot)
            self._adapters[name] = entry
            return digest

    def unload(self, name: str) -> None:
        """Drop an adapter entirely (its slot and its CPU copy)."""
        with self._lock:
            entry = self._get(name)
            if entry.slot is not None and any(entry.slot in s for s in self._busy):
                raise RuntimeError(f"adapter {name!r} is in use by a running batch")
            self._free(entry)
            del self._adapters[name]

    def pin(self, name: str) -> None:
        """Keep the adapter resident: it is never evicted until unpinned."""
        with self._lock:
            entry = self._get(name)
            self._ensure_resident([name])  # first: a pin that finds no slot leaves the adapter unpinned
            entry.pinned = True

    def unpin(self, name: str) -> None:
        with self._lock:
            self._get(name).pinned = False

    def adapters(self) -> dict:
        """name -> {"slot", "pinned", "sha256", "resident"}."""
        with self._lock:
            return {n: {"slot": a.slot, "pinned": a.pinned, "sha256": a.digest, "resident": a.slot is not None}
                    for n, a in self._adapters.items()}

    def digest(self, name: str) -> str:
        return self._get(name).digest

    @contextlib.contextmanager
    def batch(self, names: Sequence[Optional[str]]):
        """``with pool.batch(["a", None, "b"]): model(...)``, like ``adapter_batch``: one name per sequence.

        Makes the adapters resident (evicting the least recently used unpinned ones) and holds the
        pool lock until the block ends, so no slot the forward reads changes under it.
        """
        if isinstance(names, str):
            raise TypeError("names must be a sequence with one adapter name per sequence, not a string")
        names = [BASE if n is None else n for n in names]
        used = list(dict.fromkeys(n for n in names if n != BASE))
        with self._lock:
            unknown = sorted(set(used) - set(self._adapters))
            if unknown:
                raise KeyError(f"unknown adapter(s) {unknown}; loaded: {sorted(self._adapters)}")
            if len(used) > self.num_slots:
                raise ValueError(f"a batch uses {len(used)} distinct adapters but the pool has {self.num_slots} slots")
            self._ensure_resident(used)
            slots = {self._adapters[n].slot for n in used}
            seq = torch.tensor([-1 if n == BASE else self._adapters[n].slot for n in names],
                               dtype=torch.int64, device=self.device)
            previous = {p: layer.mixed_batch for p, layer in self.layers.items()}
            self._busy.append(slots)
            try:
                for path, layer in self.layers.items():
                    layer.mixed_batch = self._make_hook(path, seq)
                yield self.model
            finally:
                for path, layer in self.layers.items():
                    layer.mixed_batch = previous[path]
                self._busy.pop()

    # -- slots (lock held) ---------------------------------------------------------------------
    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded: {sorted(self._adapters)}")
        return self._adapters[name]

    def _free(self, entry: _Adapter) -> None:
        if entry.slot is not None:
            for bufs in self._buffers.values():
                bufs[3][entry.slot] = 0  # rank 0: the slot contributes nothing even if an id points at it
            for table in self._dora.values():
                table[entry.slot] = 0
            self._slots[entry.slot] = None
            entry.slot = None

    def _ensure_resident(self, names: list) -> None:
        want = set(names)
        for name in names:
            entry = self._adapters[name]
            entry.last_used = next(self._clock)
            if entry.slot is not None:
                continue
            slot = self._pick_slot(name, want)
            if self._slots[slot] is not None:
                self._free(self._adapters[self._slots[slot]])  # evicted to its CPU copy
            self._write(entry, slot)

    def _pick_slot(self, name: str, want: set) -> int:
        """A free slot, else the least recently used evictable one; raises, changing nothing, if none."""
        free = [i for i, n in enumerate(self._slots) if n is None]
        if free:
            return free[0]
        busy = set().union(*self._busy) if self._busy else set()
        victims = [self._adapters[n] for n in self._slots
                   if not self._adapters[n].pinned and n not in want and self._adapters[n].slot not in busy]
        if not victims:
            raise RuntimeError(f"no slot for adapter {name!r}: all {self.num_slots} slots are pinned or in use")
        return min(victims, key=lambda a: a.last_used).slot

    def _write(self, entry: _Adapter, slot: int) -> None:
        with torch.no_grad():
            for path, (a_buf, b_buf, scal, ranks) in self._buffers.items():
                if path in entry.layers:
                    a, b, s = entry.layers[path]
                    r = a.shape[0]
                    a_buf[slot, :r].copy_(a)
                    b_buf[slot, :, :r].copy_(b)
                    a_buf[slot, r:].zero_()
                    b_buf[slot, :, r:].zero_()
                    scal[slot], ranks[slot] = s, r
                else:
                    scal[slot], ranks[slot] = 0.0, 0
            for path, row in entry.extra.get("dora", {}).items():
                if path not in self._dora:  # (g - 1) per slot; the last row stays 0 for base rows (id -1)
                    self._dora[path] = torch.zeros((self.num_slots + 1, row.shape[0]), dtype=torch.float32,
                                                   device=self._buffers[path][0].device)
            for path, table in self._dora.items():
                row = entry.extra.get("dora", {}).get(path)
                table[slot] = 0 if row is None else row.to(table.device)
        self._slots[slot] = entry.name
        entry.slot = slot

    def _make_hook(self, path: str, seq_ids: torch.Tensor):
        a_buf, b_buf, scal, ranks = self._buffers[path]

        def hook(layer, x):
            if path in self._dora:  # some slot holds a DoRA adapter: per-row magnitudes
                return scaled_mixed_forward(layer, x, self._dora[path], a_buf, b_buf, scal, ranks, seq_ids)
            return run_layer(layer, x, a_buf, b_buf, scal, ranks, seq_ids)
        return hook

    def _dora_rows(self, name: str, config: LoraConfig, tensors: dict, layers: dict) -> dict:
        """path -> (g - 1) float32 [out] (CPU) of a DoRA adapter, from its magnitudes and this pool's base
        weights (frozen while the pool serves), computed once at load."""
        rows = {}
        for path, (a, b, s) in layers.items():
            layer = self.layers[path]
            m = tensors.get(f"{PREFIX}{path}.{MAGNITUDE}", tensors.get(f"{path}.{MAGNITUDE}"))
            if m is None or tuple(m.shape) != (layer.out_features,):
                got = None if m is None else tuple(m.shape)
                raise ValueError(f"adapter {name!r}, {path!r}: {MAGNITUDE} must be [{layer.out_features}], got {got}")
            with torch.no_grad():
                rows[path] = dora_scale_row(layer, a, b, m, s).cpu()
        return rows
