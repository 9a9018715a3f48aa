"""NF4Linear: a frozen Linear whose weight is stored in 4 bits, in bitsandbytes' format.

A base-layer type, independent of adapter kinds: ``LoraLinear`` wraps it like an ``nn.Linear``.
Weight bytes per parameter: 0.5 (packed nibbles) + 4 / blocksize (fp32 absmax): 0.5625 at blocksize 64;
with double quant 0.5 + 1 / blocksize + 4 / (256 * blocksize) = 0.5159 at 64.

``state_dict()`` uses the keys transformers writes for bnb-4bit models: ``weight`` (uint8 [ceil(n/2), 1]),
``weight.absmax``, ``weight.quant_map``, (double quant:) ``weight.nested_absmax``,
``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__<nf4|fp4>`` (the JSON of the
non-tensor fields as uint8), plus ``bias``. Such a state dict written by bitsandbytes loads here, ours
loads into ``bitsandbytes.nn.Linear4bit`` through transformers / ``Params4bit.from_prequantized``.

The quantization state is held in buffers that ``model.half()`` / ``.to(dtype)`` never cast (only
moved between devices); a dtype change of the module changes ``compute_dtype``, the dtype of
``dequantize()`` and of merged layers. The forward computes in the input's dtype.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import torch
from torch import nn

from ..ops.nf4_linear import nf4_lora_linear
from ..reference.nf4 import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    NF4Weight,
    code_table,
    dequantize_4bit,
    double_quantize,
    quantize_4bit,
)

_QUANT_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit`` (checked by name: bitsandbytes is an optional dependency)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class NF4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if compute_dtype not in _DTYPES.values():
            raise ValueError(f"compute_dtype must be one of {list(_DTYPES.values())}, got {compute_dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.quant_type, self.blocksize, self.double_quant = quant_type, int(blocksize), bool(double_quant)
        self.compute_dtype = compute_dtype
        self.nested_offset = 0.0
        n = self.in_features * self.out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device),
                             persistent=False)
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device), persistent=False)
        self.register_buffer("quant_map", code_table(quant_type, device), persistent=False)
        nested = (torch.zeros(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                  torch.zeros(256, dtype=torch.float32, device=device)) if double_quant else (None, None)
        self.register_buffer("nested_absmax", nested[0], persistent=False)
        self.register_buffer("nested_quant_map", nested[1], persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> NF4Linear:
        """Quantize a full-precision weight [out, in] (and keep its bias in the compute dtype)."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D float tensor [out, in], got {weight.dtype} {tuple(weight.shape)}")
        dtype = compute_dtype or (weight.dtype if weight.dtype in _DTYPES.values() else torch.float32)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, quant_type, blocksize, double_quant, dtype,
                    device=weight.device)
        layer.quantize_(weight)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def quantize_(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}")
        packed, absmax = quantize_4bit(weight.detach(), self.blocksize, self.quant_type)
        self.weight = packed
        if self.double_quant:
            self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset = double_quantize(absmax)
        else:
            self.absmax = absmax

    @classmethod
    def from_bnb(cls, module: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> NF4Linear:
        """Adopt a bitsandbytes ``Linear4bit``: its packed bytes and quant state, not requantized."""
        w = module.weight
        if not getattr(w, "bnb_quantized", False) or getattr(w, "quant_state", None) is None:
            return cls.from_weight(w.data, None if module.bias is None else module.bias.data,
                                   getattr(w, "quant_type", "fp4"), getattr(w, "blocksize", 64),
                                   getattr(w, "compress_statistics", True), compute_dtype)
        state = module.state_dict()  # bitsandbytes undoes its CPU repacking here
        qs = json.loads(bytes(next(v for k, v in state.items() if "quant_state." in k).tolist()).decode())
        dtype = compute_dtype or getattr(module, "compute_dtype", None) or _DTYPES[qs["dtype"]]
        layer = cls(module.in_features, module.out_features, module.bias is not None, qs["quant_type"],
                    qs["blocksize"], "nested_absmax" in state, dtype, device=w.device)
        layer.load_state_dict(state)
        layer.compute_dtype = dtype
        return layer

    # -- weights -----------------------------------------------------------------------------------
    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map,
                         self.nested_offset, self.blocksize, self.out_features, self.in_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full weight [out, in] (materialized: for merging, export and the multi-adapter paths)."""
        return dequantize_4bit(self.weight, self.absmax, self.quant_map, self.blocksize,
                               (self.out_features, self.in_features), dtype or self.compute_dtype,
                               self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.absmax, self.nested_absmax)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_lora_linear(x, self.nf4_weight(), bias)

    # -- device / dtype moves: quant buffers keep their dtypes ---------------------------------------
    def _apply(self, fn, recurse=True):
        held = {k: self._buffers.pop(k) for k in _QUANT_BUFFERS}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=held["weight"].device))
        finally:
            for k, t in held.items():
                self._buffers[k] = t
        for k, t in held.items():
            if t is not None:
                self._buffers[k] = t.to(probe.device)
        if probe.dtype in _DTYPES.values():
            self.compute_dtype = probe.dtype
        return self

    # -- state dict in transformers' bnb-4bit layout -------------------------------------------------
    def _quant_state_json(self) -> dict:
        out = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.compute_dtype),
               "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            out.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested_offset)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def put(key, t):
            destination[prefix + key] = t if keep_vars else t.detach()

        put("weight", self.weight)
        if self.bias is not None:
            put("bias", self.bias)
        put("weight.absmax", self.absmax)
        put("weight.quant_map", self.quant_map)
        if self.double_quant:
            put("weight.nested_absmax", self.nested_absmax)
            put("weight.nested_quant_map", self.nested_quant_map)
        text = json.dumps(self._quant_state_json()).encode("utf-8")
        put(f"weight.quant_state.bitsandbytes__{self.quant_type}", torch.tensor(list(text), dtype=torch.uint8))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)
                and (k[len(prefix):] in ("weight", "bias") or k[len(prefix):].startswith("weight."))}
        qs_keys = [k for k in mine if k.startswith("weight.quant_state.bitsandbytes__")]
        if "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        if len(qs_keys) != 1:
            error_msgs.append(f"{prefix}weight: a 4-bit weight needs exactly one weight.quant_state.bitsandbytes__"
                              f"<nf4|fp4> entry, found {len(qs_keys)} (is this a bitsandbytes 4-bit checkpoint?)")
            return
        try:
            self._load_quantized(mine, qs_keys[0])
        except (ValueError, KeyError) as exc:
            error_msgs.append(f"{prefix}: {exc}")
            return
        if self.bias is not None:
            if "bias" not in mine:
                missing_keys.append(prefix + "bias")
            else:
                with torch.no_grad():
                    self.bias.copy_(mine["bias"].to(self.bias.dtype))
        elif "bias" in mine:
            unexpected_keys.append(prefix + "bias")
        known = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map", qs_keys[0]}
        unexpected_keys.extend(prefix + k for k in mine if k not in known)

    def _load_quantized(self, sd: dict, qs_key: str) -> None:
        """Validate everything first, then assign: a failed load leaves the layer as it was."""
        qs = json.loads(bytes(sd[qs_key].cpu().tolist()).decode("utf-8"))
        shape = [int(s) for s in qs["shape"]]
        want = [self.out_features, self.in_features]
        if shape != want:
            raise ValueError(f"quantized weight has shape {shape}, this layer expects {want}")
        quant_type, blocksize = qs["quant_type"], int(qs["blocksize"])
        if quant_type not in QUANT_TYPES or blocksize not in BLOCKSIZES:
            raise ValueError(f"unsupported quant_type={quant_type!r} / blocksize={blocksize}")
        n = math.prod(shape)
        packed = sd["weight"]
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)  # bitsandbytes' quant_storage may be another dtype
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"weight holds {packed.numel()} bytes, a {shape} 4-bit weight needs {(n + 1) // 2}")
        blocks = -(-n // blocksize)
        absmax = sd["weight.absmax"]
        nested = "weight.nested_absmax" in sd
        if absmax.numel() != blocks or absmax.dtype != (torch.uint8 if nested else torch.float32):
            raise ValueError(f"weight.absmax must hold {blocks} {'uint8' if nested else 'float32'} values, got "
                             f"{absmax.numel()} {absmax.dtype}")
        if nested and (sd["weight.nested_absmax"].numel() != -(-blocks // NESTED_BLOCKSIZE)
                       or int(qs.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE):
            raise ValueError("weight.nested_absmax does not match the double-quant layout (blocks of 256)")
        code = sd["weight.quant_map"].float()
        if code.numel() != 16:
            raise ValueError(f"weight.quant_map must hold 16 values, got {code.numel()}")
        dev = self.weight.device
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, nested
        self.compute_dtype = _DTYPES.get(qs.get("dtype"), self.compute_dtype)
        self.weight = packed.reshape(-1, 1).to(dev)
        self.absmax = absmax.to(dev)
        self.quant_map = code.to(dev)
        if nested:
            self.nested_absmax = sd["weight.nested_absmax"].float().to(dev)
            self.nested_quant_map = sd["weight.nested_quant_map"].float().to(dev)
            self.nested_offset = float(qs["nested_offset"])
        else:
            self.nested_absmax = self.nested_quant_map = None
            self.nested_offset = 0.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
