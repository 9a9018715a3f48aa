"""``dora_linear`` and ``dora_weight_norm``: the differentiable DoRA op and its factored row norm.

Registered with torch.library (custom ops, fake kernels, autograd) like ``ops/lora_linear.py``;
the implementation (``kernels/dora.py`` or ``reference/dora.py``, one signature) is chosen per
call by ``backend.implementation``.

Saved for backward: x, the parameters, U = D(x) A^T [M, r], the [N] norm, the dropout seed and
one [M, N] tensor, y_pre = W D(x) + s U B^T, which the gradient of the magnitude needs
(dm_j = sum_t dy_tj y_pre_tj / n_j). Recovering it from the output instead would divide by m.
No [N, K] tensor is built: PEFT keeps the dense W + s B A, and with dropout also D(x) and a second
[M, N] tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import implementation
from .checks import _shape, check_lora_operands, make_seed


def _impl(device: torch.device):
    return implementation(device, "dora")


@torch.library.custom_op("lora_triton::dora_weight_sq", mutates_args=())
def _weight_sq(weight: Tensor) -> Tensor:
    return _impl(weight.device).dora_weight_sq(weight)


@_weight_sq.register_fake
def _(weight):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


@torch.library.custom_op("lora_triton::dora_weight_norm", mutates_args=())
def _weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor) -> Tensor:
    return _impl(weight.device).dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq)


@_weight_norm.register_fake
def _(weight, lora_A, lora_B, scaling, weight_sq):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


def dora_weight_sq(weight: Tensor) -> Tensor:
    """||W_i||^2 per output row of a frozen weight [N, K], float32 [N]."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point [out_features, in_features] matrix, got "
                         f"{_shape(weight)} {weight.dtype}")
    return _weight_sq(weight.detach())


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_sq: Optional[Tensor] = None) -> Tensor:
    """n = ||W + scaling B A||_2 per output row, float32 [N], detached (DoRA §4.3), from
    ||W_i||^2 (``weight_sq``, computed when None), W A^T [N, r] and A A^T [r, r]: never [N, K]."""
    n, k = weight.shape if weight.dim() == 2 else (None, None)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != k or lora_B.shape != (n, lora_A.shape[0]):
        raise ValueError(f"expected weight [N, K], lora_A [r, K], lora_B [N, r]; got weight {_shape(weight)}, "
                         f"lora_A {_shape(lora_A)}, lora_B {_shape(lora_B)}")
    if weight_sq is None:
        weight_sq = dora_weight_sq(weight)
    elif weight_sq.shape != (n,) or weight_sq.dtype != torch.float32:
        raise ValueError(f"weight_sq must be float32 [{n}], got {weight_sq.dtype} {_shape(weight_sq)}")
    return _weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling), weight_sq)


@torch.library.custom_op("lora_triton::dora_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
         weight_norm: Tensor, scaling: float, dropout_p: float,
         seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return tuple(_impl(x.device).dora_linear_fwd(x, weight, bias, a, b, magnitude, weight_norm, scaling,
                                                 dropout_p, seed))


@_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed):
    m, n = x.shape[0], lora_B.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, lora_A.shape[0])), x.new_empty((m, n))


@torch.library.custom_op("lora_triton::dora_linear_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
         weight_norm: Tensor, u: Tensor, y_pre: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
         need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, d_a, d_b, d_m = _impl(x.device).dora_linear_bwd(
        dy, x, weight, lora_A.to(x.dtype), lora_B.to(x.dtype), magnitude, weight_norm, u, y_pre, scaling,
        dropout_p, seed, need_dx)
    return (x.new_empty(0) if dx is None else dx), d_a, d_b, d_m


@_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, weight_norm, u, y_pre, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    f32 = torch.float32
    return (dx, lora_A.new_empty(lora_A.shape, dtype=f32), lora_B.new_empty(lora_B.shape, dtype=f32),
            magnitude.new_empty(magnitude.shape, dtype=f32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, output[1], output[2], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    # u and y_pre are internal outputs nobody differentiates: no [M, N] zero gradient for y_pre.
    ctx.set_materialize_grads(False)


def _weight_grad(dy, x, magnitude, weight_norm, dropout_p, seed):
    """dL/dW for the rare case of a trainable base weight (n stays detached, as in PEFT)."""
    from ..reference.dora import dora_scales
    from ..reference.philox import apply_dropout

    g, gm1 = dora_scales(magnitude, weight_norm)
    if dropout_p == 0.0:
        return (dy * g.to(dy.dtype)).t() @ x
    return dy.t() @ x + (dy * gm1.to(dy.dtype)).t() @ apply_dropout(x, seed, dropout_p)


def _backward(ctx, dy, _du, _dy_pre):
    x, weight, lora_A, lora_B, magnitude, weight_norm, u, y_pre, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:
        return (None,) * 10
    dy = dy.contiguous()
    dx, d_a, d_b, d_m = _bwd(dy, x, weight, lora_A, lora_B, magnitude, weight_norm, u, y_pre, ctx.scaling,
                             ctx.dropout_p, seed, need[0])
    d_w = _weight_grad(dy, x, magnitude, weight_norm, ctx.dropout_p, seed).to(weight.dtype) if need[1] else None
    d_bias = dy.sum(0) if need[2] else None
    return ((dx if need[0] else None), d_w, d_bias, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype),
            d_m.to(magnitude.dtype), None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_dora_operands(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p) -> None:
    if weight is None:
        raise ValueError("dora_linear needs the base weight [out_features, in_features], got None")
    check_lora_operands(x, weight, bias, lora_A, lora_B, dropout_p)
    n = lora_B.shape[0]
    if magnitude.shape != (n,) or not magnitude.is_floating_point():
        raise ValueError(f"magnitude must be a floating-point [out_features={n}] vector, got "
                         f"{magnitude.dtype} {_shape(magnitude)}")
    if weight_norm is not None and (weight_norm.shape != (n,) or weight_norm.dtype != torch.float32):
        raise ValueError(f"weight_norm must be float32 [out_features={n}], got {weight_norm.dtype} "
                         f"{_shape(weight_norm)}")
    if magnitude.device != x.device or (weight_norm is not None and weight_norm.device != x.device):
        raise ValueError(f"magnitude / weight_norm must be on x's device {x.device}")


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_p: float = 0.0, seed=None,
                weight_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA: y = (m / n) (x W^T + s D(x) A^T B^T) + b at dropout_p = 0; with dropout PEFT's
    y = x W^T + b + (m / n - 1) D(x) W^T + (m / n) s D(x) A^T B^T. n = ||W + s B A||_row, detached.

    Differentiable in x, lora_A, lora_B, magnitude (and weight, bias if they require grad).
    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_A: [r, K]; lora_B: [N, r]; magnitude: [N].
    weight_norm: the float32 [N] norm from ``dora_weight_norm`` (computed when None; a layer
    caches it while W, A and B are unchanged). seed as for ``lora_linear``.
    """
    check_dora_operands(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    seed_t = make_seed(seed, x.device) if dropout_p > 0.0 else None
    y, _, _ = _fwd(x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, float(scaling), float(dropout_p),
                   seed_t)
    return y.reshape(*lead, y.shape[-1])
