"""``patch_peft(model)``: run an existing PEFT model's LoRA layers on lora_triton's fused op, in place.

Nothing of PEFT's is replaced: the module tree, the parameter objects and names, the state dict,
``save_pretrained``, ``set_adapter``, ``disable_adapter``, merging and ``adapter_names=`` mixed batches
all stay PEFT's. Only the ``forward`` of each plain ``peft.tuners.lora.Linear`` (base ``nn.Linear`` or
transformers' ``Conv1D``) is shadowed by an instance attribute, so an optimizer built before the call
keeps training the same tensors and ``unpatch_peft`` just deletes the attribute.

The patched forward decides per call: when the layer is in a state or gets arguments the fused op
does not cover (mixed batch, merged or disabled adapters, a LoRA variant such as DoRA, a custom
dropout module, extra base-layer arguments, a dtype PEFT would cast), it runs PEFT's own forward,
so the result is always PEFT's semantics. Dropout on the fused path uses lora_triton's counter-based
mask (one seed per call from torch's generator), not ``nn.Dropout``'s.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Optional

import torch
from torch import nn

from ..ops.lora_linear import lora_linear
from .lora_bias import with_lora_bias
from .lora_linear import is_conv1d

PATCHED_ATTR = "_lora_triton_patched_forward"


@dataclasses.dataclass
class PatchSummary:
    """What ``patch_peft`` did: module paths that now run the fused op, and those left on PEFT's forward."""

    patched: list[str] = dataclasses.field(default_factory=list)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why

    def __str__(self) -> str:
        lines = [f"lora_triton.patch_peft: {len(self.patched)} LoRA layers run the fused op"]
        if self.unsupported:
            lines.append(f"{len(self.unsupported)} keep PEFT's forward:")
            lines += [f"  {path}: {why}" for path, why in self.unsupported.items()]
        return "\n".join(lines)


def _peft_lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # peft is an optional dependency of lora_triton
        raise ImportError("patch_peft needs peft installed (pip install peft)") from exc
    return Linear


def _static_reason(module: nn.Module, linear_cls) -> Optional[str]:
    """Why this PEFT LoRA layer cannot be patched at all, or None when it can."""
    if type(module) is not linear_cls:
        return f"{type(module).__module__}.{type(module).__name__} is not accelerated yet"
    base = module.get_base_layer()
    if not (type(base) is nn.Linear or is_conv1d(base)):
        return f"base layer {type(base).__name__} is not nn.Linear / Conv1D"
    return None


def _variant_reason(module: nn.Module) -> Optional[str]:
    """Options that keep PEFT's forward for the adapters that use them (checked again on every call)."""
    variants = sorted(getattr(module, "lora_variant", {}))
    if variants:
        kinds = sorted({type(module.lora_variant[a]).__name__ for a in variants})
        return f"adapters {variants} use a LoRA variant ({', '.join(kinds)}): PEFT's forward"
    return None


def _dropout_p(dropout: nn.Module) -> Optional[float]:
    """The dropout probability of PEFT's per-adapter dropout module; None for a module we cannot mirror."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p) if dropout.training else 0.0
    return None


def _fused_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's Linear.forward for vanilla LoRA, on ``ops.lora_linear``; PEFT's own forward otherwise."""
    peft_forward = type(layer).forward
    if args or kwargs or layer.disable_adapters or layer.merged or not isinstance(x, torch.Tensor):
        return peft_forward(layer, x, *args, **kwargs)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active or any(a in layer.lora_variant for a in active):
        return peft_forward(layer, x, *args, **kwargs)
    probs = [_dropout_p(layer.lora_dropout[a]) for a in active]
    if any(p is None for p in probs):
        return peft_forward(layer, x, *args, **kwargs)
    base = layer.get_base_layer()
    weight = base.weight.t() if is_conv1d(base) else base.weight
    bias = base.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return peft_forward(layer, x, *args, **kwargs)  # PEFT's casting rules, not ours
    y = None
    for name, p in zip(active, probs):
        scale = layer.scaling[name]
        lora_b = layer.lora_B[name]
        term_bias = with_lora_bias(layer, name, bias if y is None else None, x.dtype)
        out = lora_linear(x, weight if y is None else None, term_bias, layer.lora_A[name].weight,
                          lora_b.weight, scale, p)
        y = out if y is None else y + out
    return y


def _peft_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer

    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def patch_peft(model: nn.Module, *, warn: bool = True) -> PatchSummary:
    """Make every plain PEFT LoRA Linear / Conv1D layer of ``model`` run lora_triton's fused op.

    ``model``: a ``peft.PeftModel`` or a transformers model with adapters attached via ``add_adapter``.
    Returns a :class:`PatchSummary`; layers (or adapters) we do not accelerate keep PEFT's forward and
    are named there and in one warning. Calling it again patches layers added since; ``unpatch_peft``
    restores PEFT's forward everywhere.
    """
    linear_cls = _peft_lora_linear_class()
    layers = _peft_layers(model)
    if not layers:
        raise ValueError(f"patch_peft: {type(model).__name__} has no PEFT LoRA layer (expected a PeftModel or a "
                         "transformers model with adapters added through add_adapter)")
    summary = PatchSummary()
    for path, module in layers:
        reason = _static_reason(module, linear_cls)
        if reason is not None:
            summary.unsupported[path] = reason
            continue
        if PATCHED_ATTR not in module.__dict__:
            module.forward = types.MethodType(_fused_forward, module)
            module.__dict__[PATCHED_ATTR] = True
        summary.patched.append(path)
        variant = _variant_reason(module)
        if variant is not None:
            summary.unsupported[path] = variant
    if warn and summary.unsupported:
        reasons = sorted(set(summary.unsupported.values()))
        warnings.warn(f"lora_triton.patch_peft: {len(summary.unsupported)} of {len(layers)} LoRA layers (or some of "
                      f"their adapters) keep PEFT's forward: {'; '.join(reasons)[:500]} (see the returned summary)",
                      stacklevel=2)
    return summary


def unpatch_peft(model: nn.Module) -> int:
    """Restore PEFT's forward on every layer ``patch_peft`` changed; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if module.__dict__.pop(PATCHED_ATTR, None):
            module.__dict__.pop("forward", None)
            restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    return bool(module.__dict__.get(PATCHED_ATTR))
