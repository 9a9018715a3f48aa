"""AdapterLayer: the shared shell of every adapter layer other than LoraLinear.

A layer holds one frozen ``base_layer`` and any number of named adapters of one kind (LoRA on an
Embedding or a Conv, LoHa, LoKr). Subclasses say which attributes hold per-adapter tensors
(``param_dicts``, PEFT's in-memory names), map them to PEFT's disk key suffixes
(``adapter_tensors``), compute the adapter's output (``adapter_forward``) and its dense weight delta
for merging only (``delta_weight``). Activation, disabling, merge / unmerge / safe_merge and deletion
live here once, with the same attribute names as ``LoraLinear`` so model-level code treats all alike.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .batch_slot import mixed_batch_slot


class AdapterLayer(nn.Module):
    param_dicts: tuple[str, ...] = ()
    mixed_batch = mixed_batch_slot()  # per thread (nn/batch_slot.py): set by serving.adapter_batch
    setting_dicts: tuple[str, ...] = ("scaling",)  # per-adapter plain dicts, forgotten on delete
    fuses_linear = False  # True: one adapter on a Linear runs as ``linear_forward`` (base GEMM included)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for attr in self.setting_dicts:  # per-adapter settings by name, declared once by the subclass
            setattr(self, attr, {})
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []

    # -- adapters -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.param_dicts:
            names.update(dict.fromkeys(getattr(self, attr)))
        return list(names)

    def has_adapter(self, name: str) -> bool:
        return any(name in getattr(self, attr) for attr in self.param_dicts)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's disk key suffix (after ``<module path>.``) -> this adapter's parameter. By default the
        suffix is the attribute name (LoHa's / LoKr's ``hada_*`` / ``lokr_*`` ParameterDicts)."""
        return {attr: getattr(self, attr)[name] for attr in self.param_dicts if name in getattr(self, attr)}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_tensors(name).values())

    def _check_new(self, name: str) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer (have {self.adapter_names()})")

    def adapter_dtype(self) -> torch.dtype:
        # Adapters stay fp32 on a half-precision base (PEFT's default), fp64 on an fp64 base.
        w = self.base_layer.weight
        return w.dtype if w.dtype == torch.float64 else torch.float32

    @staticmethod
    def merge_value(t: torch.Tensor) -> torch.Tensor:
        """``t`` detached in the merge precision: fp32, or fp64 when it is fp64."""
        return t.detach().to(torch.promote_types(t.dtype, torch.float32))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        for attr in self.param_dicts:
            table = getattr(self, attr)
            if name in table:
                del table[name]
        for attr in self.setting_dicts:
            getattr(self, attr).pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mixed_batch is not None:
            return self.mixed_batch(self, x, *args, **kwargs)
        name = self.single_linear_adapter(x, args, kwargs) if self.fuses_linear else None
        if name is not None:
            return self.base_layer(x) if self.module_dropped(name) else self.linear_forward(name, x)
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if self.has_adapter(name) and name not in self.merged_adapters:
                result = self.add_adapter_output(name, x, result)
        return result

    def linear_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus adapter ``name``'s term in one op (a kind with ``fuses_linear`` on a Linear base)."""
        raise NotImplementedError

    def module_dropped(self, name: str) -> bool:
        """PEFT's module_dropout (kinds with that setting): in training, one ``torch.rand(1)`` draw on every
        forward (PEFT's RNG order, so seeded masks repeat PEFT's); the adapter is skipped this call when it is
        <= module_dropout. With module_dropout 0 the draw is not read (PEFT skips only on a draw of exactly 0),
        so the training forward has no data-dependent branch and compiles in one graph."""
        if not self.training:
            return False
        draw, p = torch.rand(1), self.module_dropout[name]
        return bool(p) and not draw > p

    def rank_dropout_rows(self, name: str) -> Optional[torch.Tensor]:
        """PEFT's rank_dropout (kinds with that setting): in training, a mask over the output features from
        ``torch.rand(out) > rank_dropout``, divided by its mean where ``rank_dropout_scaled``; None otherwise."""
        p = self.rank_dropout[name]
        if not (self.training and p):
            return None
        drop = (torch.rand(self.base_layer.weight.shape[0]) > p).to(torch.float32)
        if self.rank_dropout_scaled(name):
            drop = drop / drop.mean()
        return drop.to(self.base_layer.weight.device)

    def rank_dropout_scaled(self, name: str) -> bool:
        return True

    def dense_conv_term(self, x: torch.Tensor, delta: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """conv(x, delta) with the base conv's stride, padding, dilation, groups and padding_mode; the output
        channels (rows of delta) scaled by ``row_scale`` when given."""
        if row_scale is not None:
            delta = delta * row_scale.reshape(-1, *([1] * (delta.dim() - 1)))
        return self.base_layer._conv_forward(x, delta.to(x.dtype), None)

    def single_linear_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
        """The one active, unmerged adapter when this call can fuse it with the base GEMM (a Linear base,
        no mixed batch, adapters enabled, x in the base's dtype); None otherwise."""
        if not isinstance(self.base_layer, nn.Linear) or self.mixed_batch is not None or self.disable_adapters:
            return None
        names = [n for n in self.active_adapters if self.has_adapter(n) and n not in self.merged_adapters]
        if args or kwargs or len(names) != 1 or x.dtype != self.base_layer.weight.dtype:
            return None
        return names[0]

    def add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the adapter's output; a layer type that can accumulate in place overrides it."""
        delta = self.adapter_forward(name, x)
        return result if delta is None else result + delta.to(result.dtype)

    def adapter_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The adapter's contribution to the output (None: skipped this call, e.g. module_dropout)."""
        raise NotImplementedError

    # -- merging --------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's dense weight delta (merging only), shaped like the base weight, in ``merge_value``'s
        precision."""
        raise NotImplementedError

    def delta_bias(self, name: str) -> Optional[torch.Tensor]:
        return None

    def _merged_values(self, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weight and bias with these adapters folded in, in fp32 (nothing is written)."""
        merged_w = self.merge_value(self.base_layer.weight) + sum(self.delta_weight(n) for n in names)
        return merged_w, self._merged_bias(names, sign=1)

    def _merged_bias(self, names: list[str], sign: int) -> Optional[torch.Tensor]:
        """The base bias (merge precision) with these adapters' bias deltas added (sign 1) or taken out
        (sign -1); None when none of them has a bias delta."""
        biases = [b for b in (self.delta_bias(n) for n in names) if b is not None]
        if not biases:
            return None
        if getattr(self.base_layer, "bias", None) is None:
            raise ValueError("cannot merge an adapter bias into a base layer that has no bias")
        return self.merge_value(self.base_layer.bias) + sign * sum(biases)

    def merged_as_stored(self, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What a merge would write: the merged values rounded once to the base's dtypes (safe_merge checks
        these: an fp16 / bf16 base can overflow in the cast)."""
        merged_w, merged_b = self._merged_values(names)
        w_dtype = self.base_layer.weight.dtype
        return merged_w.to(w_dtype), None if merged_b is None else merged_b.to(self.base_layer.bias.dtype)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> list[str]:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        for name in names:
            if not self.has_adapter(name):
                raise KeyError(f"unknown adapter {name!r}; this layer has {self.adapter_names()}")
        if not names:
            return []
        merged_w, merged_b = self.merged_as_stored(names)  # one rounding, from fp32
        if safe_merge and not (merged_w.isfinite().all() and (merged_b is None or merged_b.isfinite().all())):
            raise ValueError(f"safe_merge: merging adapters {names} gives non-finite weights; nothing was changed")
        with torch.no_grad():
            self.base_layer.weight.copy_(merged_w)
            if merged_b is not None:
                self.base_layer.bias.copy_(merged_b)
        self.merged_adapters.extend(names)
        return names

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        names = list(self.merged_adapters)
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_(self._unmerge_value(names).to(weight.dtype))
            bias = self._merged_bias(names, sign=-1)
            if bias is not None:
                self.base_layer.bias.copy_(bias.to(self.base_layer.bias.dtype))
        self.merged_adapters = []

    def _unmerge_value(self, names: list[str]) -> torch.Tensor:
        """What ``unmerge`` writes to the base weight (merge precision): these merged adapters (all of them) taken
        out."""
        return self.merge_value(self.base_layer.weight) - sum(self.delta_weight(n) for n in names)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}"
