"""``lora_linear``: the differentiable single-adapter LoRA op.

Registered with torch.library (forward op, backward op, fake kernels, autograd) so
``torch.compile(fullgraph=True)`` traces through it. The implementation behind both
ops is chosen per call by ``backend.choose_backend``: the Triton kernels or their
pure-PyTorch twin, which share one signature. A plain eager call (no tracing, modes or
tensor subclasses: ``eager.fast_path``) runs the same implementation through a plain
``autograd.Function`` instead, without the custom op's per-call cost; the bits are the same.

Saved for backward: x, U = D(x) A^T [M, r] and the dropout seed. The mask and D(x)
are regenerated from the seed, never stored (the CPU reference keeps small masks, at most
``philox.small_mask_counters()`` counters each, from forward to backward, bounded: ``reference/mask_memo.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import lora_linear as _reference
from .backend import implementation
from .checks import check_lora_operands, check_scaling, kernel_supports, make_seed
from .eager import fast_path


def _impl(x: Tensor, lora_A: Tensor):
    # Operands the kernels do not take (fp64, rank 0 or > 256, K = 0) run the reference whatever the
    # backend, so both backends accept the same inputs and give the same results.
    if not kernel_supports(x, lora_A.shape[0]):
        return _reference
    return implementation(x.device, "lora_linear")


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without dispatching the no-op cast (the usual fp32 case; a small layer's call is
    mostly such fixed costs)."""
    return t if t.dtype == dtype else t.to(dtype)


def _fwd_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, impl=None):
    """(y, U): what the custom op and the eager path run (``impl``: as in ``_bwd_impl``)."""
    a, b = _as(lora_A, x.dtype), _as(lora_B, x.dtype)
    impl = _impl(x, lora_A) if impl is None else impl
    return impl.lora_linear_fwd(x, weight, bias, a, b, scaling, dropout_p, seed)


def _bwd_impl(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, impl=None):
    """(dx or None, dA fp32, dB fp32): what both the custom op and the eager path run (``impl``: the
    implementation module the forward chose, None to choose here)."""
    return (_impl(x, lora_A) if impl is None else impl).lora_linear_bwd(
        dy, x, weight, _as(lora_A, x.dtype), _as(lora_B, x.dtype), u, scaling, dropout_p, seed, need_dx)


@torch.library.custom_op("lora_triton::lora_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
         scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return tuple(_fwd_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))


@_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], lora_B.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lora_triton::lora_linear_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, u: Tensor,
         scaling: float, dropout_p: float, seed: Optional[Tensor], need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, d_a, d_b = _bwd_impl(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    # A custom op cannot return None: an empty tensor stands for "not computed".
    return (x.new_empty(0) if dx is None else dx), d_a, d_b


@_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape, dtype=torch.float32), lora_B.new_empty(
        lora_B.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _grads(ctx, dy, bwd, saved=None):
    """The 8 input gradients from ``bwd`` (the custom op ``_bwd``, or ``_bwd_impl`` with the forward's
    implementation bound: the same numbers). ``saved``: the saved tensors with x as [M, K] (the eager path
    saves x as given; saved tensors are unpacked once, as non-reentrant checkpointing requires)."""
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors if saved is None else saved
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dy = dy.contiguous()
    dx, d_a, d_b = bwd(dy, x, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, need_x)
    d_w = (dy.t() @ x).to(weight.dtype) if need_w else None
    d_bias = dy.sum(0) if need_b else None
    return (dx if need_x else None), d_w, d_bias, _as(d_a, lora_A.dtype), _as(d_b, lora_B.dtype), None, None, None


def _backward(ctx, dy, _du):
    return _grads(ctx, dy, _bwd)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _rows(x: Tensor) -> Tensor:
    """x [..., K] as [M, K] (not -1: K = 0 is a valid, empty input)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default  # the overload itself: no packet dispatch per call


def _unrows(y: Tensor, lead) -> Tensor:
    # Not a view of y (nothing else holds y): FSDP2 warns on modules returning views, and an in-place op
    # on a view would skip its pre-backward hook.
    return y if len(lead) == 1 else _UNSAFE_VIEW(y, (*lead, y.shape[-1]))


class _EagerLoraLinear(torch.autograd.Function):
    """The custom op's forward and backward without torch.library's wrappers (``ops/eager.py``). Takes x
    [..., K] and returns y [..., N]: the flattening happens inside, so it adds no autograd nodes."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2 = _rows(x)
        impl = _impl(x2, lora_A)
        y, u = _fwd_impl(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, impl)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed)
        ctx.scaling, ctx.dropout_p, ctx.impl = scaling, dropout_p, impl  # backward runs what forward chose
        return _unrows(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: once_differentiable's error on a second backward
            return _eager_backward_once(ctx, dy)
        return _eager_backward(ctx, dy)  # what once_differentiable runs when grad mode is off, minus its no_grad


def _eager_backward(ctx, dy):
    saved = ctx.saved_tensors
    x = saved[0]
    bwd = functools.partial(_bwd_impl, impl=ctx.impl)  # what the forward chose
    grads = _grads(ctx, _rows(dy), bwd, (_rows(x), *saved[1:]))
    dx = grads[0]
    return (None if dx is None else dx.view(x.shape), *grads[1:])


_eager_backward_once = torch.autograd.function.once_differentiable(_eager_backward)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0, seed=None) -> Tensor:
    """y = x W^T + b + scaling * D(x) A^T B^T, differentiable in x, A, B (and W, b if they require grad).

    x: [..., K]; weight: [N, K] or None (LoRA term only); bias: [N] or None; lora_A: [r, K];
    lora_B: [N, r]. The adapter may be stored in another dtype than x (fp32 adapters on a bf16
    model): it is cast to x's dtype, which is tiny, instead of copying every input to fp32; its
    gradients (fp32 from the kernels) come back in the adapter's dtype without a round trip
    through x's dtype.
    dropout_p applies to the LoRA branch only; seed (int or int64 tensor) fixes its mask, None
    draws one from torch's generator so ``torch.manual_seed`` makes runs reproducible.
    """
    check_lora_operands(x, weight, bias, lora_A, lora_B, dropout_p)
    scaling, dropout_p = check_scaling(scaling), float(dropout_p)
    # A seed tensor keeps its type through make_seed, so the verdict on the given one holds for seed_t.
    eager = fast_path(x, weight, bias, lora_A, lora_B, seed if isinstance(seed, Tensor) else None)
    seed_t = make_seed(seed, x.device, eager) if dropout_p > 0.0 else None
    if eager and _needs_grad(x, weight, bias, lora_A, lora_B):
        return _EagerLoraLinear.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
    run = _fwd_impl if eager else _fwd  # eager: nothing to differentiate, the implementation itself
    y = run(_rows(x), weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)[0]
    return _unrows(y, x.shape[:-1])
