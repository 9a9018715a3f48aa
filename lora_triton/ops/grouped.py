"""``lora_linear_grouped``: G LoRA projections that read the same x (q, k, v; gate, up).

One custom op for the whole group (forward, backward, fake kernels, autograd), so
``torch.compile(fullgraph=True)`` traces through it. Compared with G ``lora_linear`` calls:

* the shrink reads x once: U_cat = [D_1(x) A_1^T | ... | D_G(x) A_G^T] [M, sum r_g], with one
  dropout mask per projection (projection g uses seeds[g], exactly the mask ``lora_linear``
  draws with that seed, so the masks stay independent as PEFT's are);
* x is saved for backward once (plus U_cat and the G seeds), not G times;
* backward accumulates dx = sum_g dy_g W_g + D'_g(dU_g A_g) into one buffer.

The implementation (Triton kernels or the PyTorch twin) is chosen per call by
``backend.choose_backend``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .backend import implementation
from .checks import check_lora_operands, check_scaling
from .eager import fast_path
from .lora_linear import _as, _needs_grad, _rows, _unrows
from .seeds import draw_seeds


def _impl(device: torch.device):
    return implementation(device, "grouped")


def _cast(ts, dtype):
    return [_as(t, dtype) for t in ts]


def _cast_each(grads, params):
    return [_as(d, p.dtype) for d, p in zip(grads, params)]


# Lists of optional tensors would reach autograd as one opaque leaf (no gradients for their
# elements), so an absent weight or bias travels as an empty 1-D tensor and is mapped back here.
def _absent(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _opt(ts) -> list[Optional[Tensor]]:
    return [None if (t.dim() == 1 and t.numel() == 0) else t for t in ts]


def _fwd_impl(x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds) -> list[Tensor]:
    ys, u_cat = _impl(x.device).lora_linear_grouped_fwd(
        x, _opt(weights), _opt(biases), _cast(lora_As, x.dtype), _cast(lora_Bs, x.dtype), scalings, dropout_ps, seeds)
    return list(ys) + [u_cat]


def _bwd_impl(dys, x, weights, lora_As, lora_Bs, u_cat, scalings, dropout_ps, seeds, need_dx) -> list[Tensor]:
    dx, d_as, d_bs = _impl(x.device).lora_linear_grouped_bwd(
        dys, x, _opt(weights), _cast(lora_As, x.dtype), _cast(lora_Bs, x.dtype), u_cat, scalings, dropout_ps, seeds,
        need_dx)
    # A custom op cannot return None: an empty tensor stands for "not computed".
    return [x.new_empty(0) if dx is None else dx] + list(d_as) + list(d_bs)


@torch.library.custom_op("lora_triton::lora_linear_grouped_fwd", mutates_args=())
def _fwd(x: Tensor, weights: list[Tensor], biases: list[Tensor], lora_As: list[Tensor],
         lora_Bs: list[Tensor], scalings: list[float], dropout_ps: list[float],
         seeds: Optional[Tensor]) -> list[Tensor]:
    return _fwd_impl(x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds)


@_fwd.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds):
    r_tot = sum(a.shape[0] for a in lora_As)
    return [x.new_empty((x.shape[0], b.shape[0])) for b in lora_Bs] + [x.new_empty((x.shape[0], r_tot))]


@torch.library.custom_op("lora_triton::lora_linear_grouped_bwd", mutates_args=())
def _bwd(dys: list[Tensor], x: Tensor, weights: list[Tensor], lora_As: list[Tensor],
         lora_Bs: list[Tensor], u_cat: Tensor, scalings: list[float], dropout_ps: list[float],
         seeds: Optional[Tensor], need_dx: bool) -> list[Tensor]:
    return _bwd_impl(dys, x, weights, lora_As, lora_Bs, u_cat, scalings, dropout_ps, seeds, need_dx)


@_bwd.register_fake
def _(dys, x, weights, lora_As, lora_Bs, u_cat, scalings, dropout_ps, seeds, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    f32 = lambda t: t.new_empty(t.shape, dtype=torch.float32)
    return [dx] + [f32(a) for a in lora_As] + [f32(b) for b in lora_Bs]


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output[-1])


def _save(ctx, x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds, u_cat):
    g = len(lora_As)
    # x once, U_cat, the seeds; weights and adapters are parameters (no new storage).
    ctx.save_for_backward(x, u_cat, seeds, *weights, *lora_As, *lora_Bs)
    ctx.g, ctx.scalings, ctx.dropout_ps = g, scalings, dropout_ps
    # needs_input_grad has one entry per list input: record which elements need a gradient.
    ctx.w_grad = [w.requires_grad for w in weights]
    ctx.b_grad = [b.requires_grad for b in biases]


def _backward(ctx, grads):
    return _grads(ctx, grads, _bwd)


def _grads(ctx, grads, bwd, saved=None):
    """Gradients of the grouped forward from ``bwd`` (the custom op ``_bwd`` or ``_bwd_impl``: the same numbers).
    ``saved``: the saved tensors with x as [M, K] (the eager path saves x as given; saved tensors are
    unpacked once, as non-reentrant checkpointing requires)."""
    g = ctx.g
    saved = ctx.saved_tensors if saved is None else saved
    x, u_cat, seeds = saved[:3]
    weights, lora_As, lora_Bs = list(saved[3:3 + g]), list(saved[3 + g:3 + 2 * g]), list(saved[3 + 2 * g:])
    dys = [torch.zeros((x.shape[0], b.shape[0]), dtype=x.dtype, device=x.device) if dy is None else dy.contiguous()
           for dy, b in zip(grads[:g], lora_Bs)]
    need_x = ctx.needs_input_grad[0]
    outs = bwd(dys, x, weights, lora_As, lora_Bs, u_cat, ctx.scalings, ctx.dropout_ps, seeds, need_x)
    dx, d_as, d_bs = outs[0], outs[1:1 + g], outs[1 + g:]
    d_ws = [(dy.t() @ x).to(w.dtype) if need_w else None for dy, w, need_w in zip(dys, weights, ctx.w_grad)]
    d_biases = [dy.sum(0) if need_b else None for dy, need_b in zip(dys, ctx.b_grad)]
    d_as = _cast_each(d_as, lora_As)
    d_bs = _cast_each(d_bs, lora_Bs)
    return (dx if need_x else None), d_ws, d_biases, d_as, d_bs, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGrouped(torch.autograd.Function):
    """The custom op's forward and backward without torch.library's wrappers (``ops/eager.py``). Lists
    are not autograd inputs of a Function, so the tensors travel flat, G per list. Takes x [..., K] and
    returns the y_g [..., N_g] (and U_cat [M, sum r_g]): the flattening adds no autograd nodes."""

    @staticmethod
    def forward(ctx, x, scalings, dropout_ps, seeds, *flat):
        g = len(scalings)
        weights, biases, lora_As, lora_Bs = (list(flat[i * g:(i + 1) * g]) for i in range(4))
        outs = _fwd_impl(_rows(x), weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds)
        _save(ctx, x, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seeds, outs[-1])
        ctx.mark_non_differentiable(outs[-1])
        return (*(_unrows(y, x.shape[:-1]) for y in outs[:g]), outs[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        x = saved[0]
        dys = [_rows(dy) for dy in grads[:ctx.g]]
        dx, d_ws, d_biases, d_as, d_bs, *_ = _grads(ctx, dys, _bwd_impl, (_rows(x), *saved[1:]))
        return (None if dx is None else dx.view(x.shape), None, None, None, *d_ws, *d_biases, *d_as, *d_bs)


def make_seeds(seeds, g: int, device: torch.device, eager: bool | None = None) -> Tensor:
    """int64 tensor [G] on ``device``; None draws G seeds from torch's generator (no host sync; ``eager``:
    the caller's ``eager.fast_path`` verdict, passed on to ``draw_seeds``)."""
    if seeds is None:
        return draw_seeds(g, device, eager)  # ops/seeds.py: the same draw eager, compiled and per rank
    if isinstance(seeds, Tensor):
        if seeds.dtype != torch.int64 or seeds.numel() != g:
            raise ValueError(f"seeds tensor must hold {g} int64 values (one per projection), got dtype "
                             f"{seeds.dtype} shape {tuple(seeds.shape)}")
        return seeds.reshape(g).to(device)
    seeds = [int(s) for s in seeds]
    if len(seeds) != g:
        raise ValueError(f"seeds must have one entry per projection ({g}), got {len(seeds)}")
    for s in seeds:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {s}")
    return torch.tensor(seeds, dtype=torch.int64, device=device)


def _as_list(name: str, values, g: int) -> list:
    values = list(values)
    if len(values) != g:
        raise ValueError(f"{name} must have one entry per projection ({g}), got {len(values)}")
    return values


def lora_linear_grouped(x: Tensor, weights: Sequence[Optional[Tensor]], biases: Sequence[Optional[Tensor]],
                        lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], scalings: Sequence[float],
                        dropout_ps: Sequence[float], seeds=None) -> tuple[Tensor, ...]:
    """(y_1, ..., y_G), y_g = x W_g^T + b_g + s_g D_g(x) A_g^T B_g^T; differentiable like ``lora_linear``.

    x: [..., K]; weights[g]: [N_g, K] or None; biases[g]: [N_g] or None; lora_As[g]: [r_g, K];
    lora_Bs[g]: [N_g, r_g]. N_g and r_g may differ per projection (GQA: k, v narrower than q).
    seeds: None (G seeds drawn from torch's generator), a list of G ints or an int64 tensor [G];
    projection g's mask equals ``lora_linear(..., seed=seeds[g])``'s.
    """
    lora_As = list(lora_As)
    g = len(lora_As)
    if g == 0:
        raise ValueError("lora_linear_grouped needs at least one projection")
    weights, biases = _as_list("weights", weights, g), _as_list("biases", biases, g)
    lora_Bs = _as_list("lora_Bs", lora_Bs, g)
    scalings = [check_scaling(s) for s in _as_list("scalings", scalings, g)]
    dropout_ps = [float(p) for p in _as_list("dropout_ps", dropout_ps, g)]
    for i in range(g):
        try:
            check_lora_operands(x, weights[i], biases[i], lora_As[i], lora_Bs[i], dropout_ps[i])
        except (ValueError, TypeError) as e:
            raise type(e)(f"projection {i}: {e}") from None
    weights = [_absent(x) if w is None else w for w in weights]
    biases = [_absent(x) if b is None else b for b in biases]
    tensors = (*weights, *biases, *lora_As, *lora_Bs)
    # A plain eager call: the implementation without the custom op (and the seed draw without its op, as in
    # lora_linear). A seeds tensor keeps its type through make_seeds, so the verdict on it holds for seed_t.
    eager = fast_path(x, seeds if isinstance(seeds, Tensor) else None, *tensors)
    seed_t = make_seeds(seeds, g, x.device, eager) if any(p > 0.0 for p in dropout_ps) else None
    if eager and _needs_grad(x, *tensors):
        return _EagerGrouped.apply(x, scalings, dropout_ps, seed_t, *tensors)[:g]
    x2 = _rows(x)
    run = _fwd_impl if eager else _fwd
    outs = run(x2, weights, biases, lora_As, lora_Bs, scalings, dropout_ps, seed_t)
    return tuple(_unrows(y, x.shape[:-1]) for y in outs[:g])
