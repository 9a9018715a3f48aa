"""Input validation shared by the ops: clear errors before any kernel reads memory."""

from __future__ import annotations

import math
import numbers

import torch

from .seeds import draw_seeds


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def check_same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_lora_operands(x, weight, bias, lora_A, lora_B, dropout_p: float) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a scalar")
    k = x.shape[-1]
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, in_features={k}], got {_shape(lora_A)} (x is {_shape(x)})")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[1] != r:
        raise ValueError(f"lora_B must be [out_features, r={r}], got {_shape(lora_B)} (lora_A is {_shape(lora_A)})")
    n = lora_B.shape[0]
    if weight is not None:
        if weight.shape != (n, k):
            raise ValueError(f"weight must be [out_features={n}, in_features={k}], got {_shape(weight)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [out_features={n}], got {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    if not x.is_floating_point() or not lora_A.is_floating_point() or not lora_B.is_floating_point():
        raise TypeError(f"x, lora_A, lora_B must be floating point, got {x.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    check_dropout_p(dropout_p)
    d = x.device  # the usual all-on-one-device case without building the listing
    if (lora_A.device != d or lora_B.device != d or (weight is not None and weight.device != d)
            or (bias is not None and bias.device != d)):
        check_same_device({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})


def _real(name: str, value) -> float:
    """A Python / numpy real number (bool and strings refused) as float."""
    if type(value) is float:  # the usual case, without the numbers.Real ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def check_dropout_p(dropout_p) -> float:
    p = _real("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p


def check_scaling(scaling) -> float:
    """Non-finite scalings are refused: the backends would disagree on them (addmm's alpha=nan acts as 1.0)."""
    if isinstance(scaling, torch.Tensor) and scaling.numel() == 1 and scaling.is_floating_point():
        scaling = scaling.item()
    s = _real("scaling", scaling)
    if not math.isfinite(s):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    return s


# What the fused training kernels take; other operands run the reference on every backend, so the
# backends never differ in what they accept (ops/lora_linear.py).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_RANK = 256


def kernel_supports(x: torch.Tensor, rank: int) -> bool:
    return x.dtype in KERNEL_DTYPES and 1 <= rank <= KERNEL_MAX_RANK and x.shape[-1] > 0


def make_seed(seed, device: torch.device, eager: bool | None = None) -> torch.Tensor:
    """An int64 tensor [1] on ``device``; None draws one from torch's generator (no host sync; ``eager``:
    the caller's ``eager.fast_path`` verdict, passed on to ``draw_seeds``)."""
    if seed is None:
        return draw_seeds(1, device, eager)  # ops/seeds.py: the same draw eager, compiled and per rank
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed tensor must hold one int64, got dtype {seed.dtype} shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, an int64 tensor [1] or None, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)
