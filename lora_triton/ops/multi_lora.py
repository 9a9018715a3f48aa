"""``multi_lora_linear``: one batch, many adapters (serving).

y = x W^T + b + sum over each token's slots of w * s_a * B_a[:, :r_a] A_a[:r_a] x.

Registered as the torch.library custom op ``lora_triton::multi_lora_linear`` with a fake
impl, so ``torch.compile`` traces through it. Inference op: the adapters (lora_A, lora_B,
scalings, adapter_weights) get no gradient, and asking for one raises; x, weight and bias are
differentiable (the dx of the LoRA term is the same op with A and B swapped and transposed).
Plain eager inference calls (``_plain_eager``) run the backend directly, without the custom op's
dispatch; everything traced, transformed or differentiated goes through the op.

Validation of shapes, dtypes and devices is free (metadata only) and always on. Checking the
*values* of adapter_ids and ranks needs a host sync: ``validate=False`` skips it, for decode
steps whose ids were checked once with ``check_adapter_ids`` (e.g. at adapter activation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import multi_lora as _reference
from ..reference.multi_lora import full_ranks
from .backend import implementation
from .checks import _shape, check_same_device
from .eager import _PLAIN as _PLAIN_TYPES
from .eager import enabled as eager_enabled


def _impl(device: torch.device):
    return implementation(device, "multi_lora")


@torch.library.custom_op("lora_triton::multi_lora_linear", mutates_args=())
def _op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
        scalings: Tensor, adapter_ids: Tensor, ranks: Tensor, adapter_weights: Optional[Tensor]) -> Tensor:
    return _impl(x.device).multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks,
                                             adapter_weights)


@_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights):
    return x.new_empty((x.shape[0], lora_B.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight, lora_A, lora_B, scalings, ids, ranks, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dy = dy.contiguous()
    dx = None
    if need_x:  # dx = dy W + sum w s A_a^T B_a^T dy: the forward op with (B^T, A^T) as (A, B)
        w_t = None if weight is None else weight.t()
        dx = _op(dy, w_t, None, lora_B.transpose(1, 2), lora_A.transpose(1, 2), scalings, ids, ranks, w)
    d_w = (dy.t() @ x).to(weight.dtype) if need_w else None
    d_b = dy.sum(0) if need_b and ctx.has_bias else None
    return dx, d_w, d_b, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def check_adapter_ids(adapter_ids: Tensor, num_adapters: int, ranks: Optional[Tensor] = None,
                      r_max: Optional[int] = None, scalings: Optional[Tensor] = None) -> None:
    """Value checks (host syncs): ids in [-1, num_adapters), ranks in [0, r_max], scalings finite."""
    if scalings is not None and scalings.numel() and not bool(torch.isfinite(scalings).all()):
        raise ValueError(f"scalings must be finite, got {scalings.tolist()}")
    if adapter_ids.numel():
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(f"adapter_ids must be in [-1, {num_adapters - 1}] (-1 = no adapter; "
                             f"{num_adapters} adapters stacked), got values in [{lo}, {hi}]")
    if ranks is not None and ranks.numel():
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or (r_max is not None and hi > r_max):
            raise ValueError(f"ranks must be in [0, r_max={r_max}], got values in [{lo}, {hi}]")


def _slots(adapter_ids: Tensor, lead: tuple, t: int) -> int:
    """Number of slots k per token; adapter_ids is lead, lead + (k,), [T] or [T, k]."""
    shape = tuple(adapter_ids.shape)
    if shape == lead or shape == (t,):
        return 1
    if shape[:-1] == lead or (len(shape) == 2 and shape[0] == t):
        return shape[-1]
    raise ValueError(f"adapter_ids must be {lead}, {lead + ('k',)}, ({t},) or ({t}, k) for x of shape "
                     f"{lead + ('in',)}, got {shape}")


def _as_tensor(v, dtype, device, name) -> Tensor:
    if isinstance(v, Tensor):
        if v.device != device:
            raise ValueError(f"{name} must be on {device} (x's device), got {v.device}")
        return v if v.dtype == dtype else v.to(dtype)
    return torch.as_tensor(v, dtype=dtype, device=device)


def multi_lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scalings, adapter_ids: Tensor, ranks: Optional[Tensor] = None,
                      adapter_weights: Optional[Tensor] = None, *, validate: bool = True) -> Tensor:
    """Base linear plus, per token, a weighted sum of LoRA terms from a stack of adapters.

    x [..., in]; weight [out, in] (None: LoRA term only); bias [out] or None;
    lora_A [L, r_max, in]; lora_B [L, out, r_max] (any float dtype, cast to x's inside the kernels);
    scalings [L] (lora_alpha / r per adapter); adapter_ids int, x.shape[:-1] or x.shape[:-1] + (k,),
    or flattened [T] / [T, k]; -1 = no adapter in that slot; ranks int [L] (None = r_max): only
    A_a[:r_a], B_a[:, :r_a] are read; adapter_weights float, same shape as adapter_ids (None = 1).
    Tokens whose slots are all -1 get exactly F.linear(x, weight, bias).
    validate=False skips the value checks that need a host sync (ids range, ranks range).
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [..., in_features]")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    lead, kdim = tuple(x.shape[:-1]), x.shape[-1]
    t = math.prod(lead)
    if lora_A.dim() != 3 or lora_A.shape[2] != kdim:
        raise ValueError(f"lora_A must be [L, r_max, in_features={kdim}], got {_shape(lora_A)}")
    num, r_max = lora_A.shape[0], lora_A.shape[1]
    if lora_B.dim() != 3 or lora_B.shape[0] != num or lora_B.shape[2] != r_max:
        raise ValueError(f"lora_B must be [L={num}, out_features, r_max={r_max}], got {_shape(lora_B)}")
    n = lora_B.shape[1]
    if not lora_A.is_floating_point() or lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share one floating dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if weight is not None:
        if tuple(weight.shape) != (n, kdim):
            raise ValueError(f"weight must be [out_features={n}, in_features={kdim}], got {_shape(weight)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [out_features={n}] in {x.dtype}, got {_shape(bias)} {bias.dtype}")
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex \
            or adapter_ids.dtype == torch.bool:
        got = getattr(adapter_ids, "dtype", type(adapter_ids))
        raise TypeError(f"adapter_ids must be an integer tensor, got {got}")
    k = _slots(adapter_ids, lead, t)
    if adapter_weights is not None:
        if tuple(adapter_weights.shape) != tuple(adapter_ids.shape):
            raise ValueError(f"adapter_weights must have adapter_ids' shape {tuple(adapter_ids.shape)}, "
                             f"got {_shape(adapter_weights)}")
        if not adapter_weights.is_floating_point():
            raise TypeError(f"adapter_weights must be floating point, got {adapter_weights.dtype}")
    dev = x.device
    if not _same_device(x, (weight, bias, lora_A, lora_B, adapter_ids, adapter_weights)):
        check_same_device({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
                           "adapter_ids": adapter_ids, "adapter_weights": adapter_weights})
    scal = _as_tensor(scalings, torch.float32, x.device, "scalings")
    if scal.shape != (num,):
        raise ValueError(f"scalings must be [L={num}], got {tuple(scal.shape)}")
    if ranks is None:
        rk = full_ranks(num, r_max, x.device)
    else:
        if isinstance(ranks, Tensor) and (ranks.dtype.is_floating_point or ranks.dtype == torch.bool):
            raise TypeError(f"ranks must be integers, got {ranks.dtype}")
        rk = _as_tensor(ranks, ranks.dtype if isinstance(ranks, Tensor) else torch.int64, x.device, "ranks")
        if rk.shape != (num,):
            raise ValueError(f"ranks must be [L={num}], got {tuple(rk.shape)}")
    if torch.is_grad_enabled() and any(
            isinstance(v, Tensor) and v.requires_grad for v in (lora_A, lora_B, scal, adapter_weights)):
        raise RuntimeError("multi_lora_linear is an inference op: lora_A, lora_B, scalings and adapter_weights "
                           "get no gradient; detach them or run under torch.no_grad() (train with lora_linear)")
    # No-op reshapes and casts are skipped, not dispatched: with caches cold after the base GEMM (every
    # decode step) each op costs 5-20 us.
    ids = adapter_ids if adapter_ids.shape == (t, k) else adapter_ids.reshape(t, k)
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    impl = _impl(dev)
    if validate:
        check_adapter_ids(adapter_ids, num, rk if ranks is not None else None, r_max, scal)
    elif impl is not _reference:
        # Unchecked values still never index out of bounds and mean the same on both backends: ids
        # outside [0, L) and slots of rank <= 0 are "no adapter" (exactly nothing added, whatever the
        # scaling); ranks act clamped to [0, r_max]. Both backends read them so; this one device op
        # (no sync) only keeps ids above L from indexing past the kernels' plan (the reference's sort
        # drops them itself).
        ids = ids.clamp(max=num)
    if rk.dtype != torch.int32:  # clamped before the cast: 2**32 + 4 must not become rank 4
        rk = rk.clamp(0, r_max).to(torch.int32)
    w = None if adapter_weights is None else adapter_weights.reshape(t, k).to(torch.float32)
    args = (x if x.dim() == 2 else x.reshape(t, kdim), weight, bias, lora_A, lora_B, scal, ids, rk, w)
    y = impl.multi_lora_linear(*args) if _plain_eager(args) else _op(*args)
    return y if len(lead) == 1 else y.reshape(*lead, n)


def _same_device(x: Tensor, others) -> bool:
    """Whether every tensor of ``others`` (None skipped) is on x's device; on CPU by the is_cpu flags, which
    build no torch.device objects (each costs a few us with caches cold)."""
    if x.is_cpu:
        return all([t is None or t.is_cpu for t in others])
    dev = x.device
    return all([t is None or t.device == dev for t in others])


_PLAIN = frozenset(_PLAIN_TYPES)  # ops/eager.py's plain tensor types, as a set for one issuperset test


def _plain_eager(args) -> bool:
    """Whether the call may run the implementation without the custom op's dispatch: eager, no autograd,
    plain tensors, no torch-function or dispatch mode, ``LORA_TRITON_EAGER`` not 0 (``ops/eager.py``).
    torch.compile, export, make_fx, fake tensors, functorch transforms and calls that need dx / dW all go
    through the op. The dispatch is ~10 Python frames plus an aliasing check: 130-175 us per call with caches
    cold after the base GEMM (measured, T=64, K=N=4096, 2026-12-01), against ~1 ms for the whole LoRA term.
    Close to ``eager.fast_path`` (lora_linear's), but C-level checks only (no Python loop over the tensors),
    a grad test added, and autocast not refused."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or not eager_enabled():
        return False
    tensors = [a for a in args if a is not None]
    if torch._C._has_torch_function(tensors) or not _PLAIN.issuperset(map(type, tensors)):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(args[0]):
        return False
    return not torch.is_grad_enabled() or not any([a is not None and a.requires_grad for a in args[:3]])
