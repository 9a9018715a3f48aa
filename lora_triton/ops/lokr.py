"""LoKr without the Kronecker product: kron(W1, W2) x = vec(W1 X W2^T) on x reshaped to X [c, d].

With dW[(i, j), (k, l)] = W1[i, k] W2[j, l] (W1 [a, c], W2 [b, d], out = a b, in = c d) the layer term
is Y[m] = W1 X[m] W2^T, never the [out, in] product. For a conv, W2 is a kernel [b, d, *k]: X is viewed
as c groups of d channels, convolved with W2 by the base's stride, padding, dilation and padding_mode,
then mixed over c by W1 (low-rank factors multiplied out first: they are the small matrices).

Linear (``_KronChain``, forward and backward by hand): each factor is a full matrix or a low-rank pair
(W1 = w1_a w1_b, W2 = w2_a w2_b), so Y is a chain of small contractions of Z [M, rows, cols]: "left"
ops W Z[m] over the rows (one batched GEMM with W broadcast, no copy) and "right" ops Z B^T over the
columns (one GEMM over all M rows). Low-rank factors stay split: x w2_b^T first is r / b of the work of
x W2^T. The order of the left ops among the right ones is the one with the fewest multiply-adds
(``chain_order``). The base GEMM is in the same Function: the last op accumulates into x W^T + b in
place (``addmm_`` / ``baddbmm_``), and backward adds the LoKr dx into dy W in place, so no
[M, out] temporary is added elementwise. Backward recomputes the chain's intermediates (saved: x and the
factors only) and gets each factor's gradient with one GEMM: a right op's from its input and output
gradient over all M rows (no copy), a left op's from the batch sum of g[m] z[m]^T, done as one bmm and a
sum or as one GEMM on transposed copies, whichever moves fewer elements.
"""

from __future__ import annotations

import itertools
from typing import Optional, Union

import torch
from torch import Tensor

Factor = Union[Tensor, tuple[Tensor, Tensor]]  # a full matrix or a low-rank pair (a, b) with W = a b


def _left(z: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """w [p2, p] times every z[m] [p, n]: [M, p2, n] (into ``out`` when given)."""
    we = w.expand(z.shape[0], *w.shape)
    return torch.bmm(we, z) if out is None else out.baddbmm_(we, z)


def _right(z: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """z [M, p, n] times w^T [n, q] as one GEMM over all M p rows: [M, p, q] (into ``out`` when given)."""
    m, p, n = z.shape
    if out is None:
        return (z.reshape(m * p, n) @ w.t()).view(m, p, w.shape[0])
    out.view(m * p, w.shape[0]).addmm_(z.reshape(m * p, n), w.t())
    return out


def _apply(kind: str, z: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return _left(z, w, out) if kind == "L" else _right(z, w, out)


def _left_weight_grad(g: Tensor, z: Tensor) -> Tensor:
    """sum_m g[m] z[m]^T for g [M, p2, n], z [M, p, n]: a bmm and a batch sum (M p2 p elements) or one GEMM
    on transposed copies (M n (p2 + p) elements), whichever moves less."""
    m, p2, n = g.shape
    p = z.shape[1]
    if p2 * p <= n * (p2 + p):
        return torch.bmm(g, z.transpose(1, 2)).sum(0)
    return g.transpose(0, 1).reshape(p2, m * n) @ z.transpose(0, 1).reshape(p, m * n).t()


def _input_grad(kind: str, g: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    m = g.shape[0]
    if kind == "R":  # z B^T -> g B
        g2 = g.reshape(-1, g.shape[-1])
        if out is None:
            return (g2 @ w).view(m, g.shape[1], w.shape[1])
        out.view(-1, w.shape[1]).addmm_(g2, w)
        return out
    return _left(g, w.t(), out)  # W z -> W^T g


def _chain_cost(ops: list[tuple[str, tuple[int, int]]], rows: int, cols: int) -> int:
    cost = 0
    for kind, (p_out, p_in) in ops:
        if kind == "L":
            cost, rows = cost + p_out * p_in * cols, p_out
        else:
            cost, cols = cost + rows * p_in * p_out, p_out
    return cost


def _interleave(lefts: list, rights: list, left_pos) -> list[tuple[str, object]]:
    """The chain as ("L" / "R", op) pairs: the left ops at positions ``left_pos``, the right ops in the rest,
    each side in its own order."""
    li, ri = iter(lefts), iter(rights)
    return [("L", next(li)) if k in left_pos else ("R", next(ri)) for k in range(len(lefts) + len(rights))]


def chain_order(lefts: list[tuple[int, int]], rights: list[tuple[int, int]], rows: int, cols: int) -> list[int]:
    """Positions (in the chain) of the left ops, in order, that give the fewest multiply-adds per row of x.
    Each op is given by its matrix shape [out, in]; left ops keep their order, right ops theirs."""
    n = len(lefts) + len(rights)
    best = None
    for pos in itertools.combinations(range(n), len(lefts)):
        cost = _chain_cost(_interleave(lefts, rights, pos), rows, cols)
        if best is None or cost < best[0]:
            best = (cost, list(pos))
    return best[1]


def _out_dims(kinds: tuple[str, ...], ws: tuple[Tensor, ...], rows: int, cols: int) -> tuple[int, int]:
    for kind, w in zip(kinds, ws):
        rows, cols = (w.shape[0], cols) if kind == "L" else (rows, w.shape[0])
    return rows, cols


class _KronChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], kinds: tuple[str, ...],
                shape: tuple[int, int], *ws: Tensor) -> Tensor:
        m, (c, d) = x2.shape[0], shape
        rows, cols = _out_dims(kinds, ws, c, d)
        z = x2.view(m, c, d)
        for kind, w in zip(kinds[:-1], ws[:-1]):
            z = _apply(kind, z, w)
        if weight is None:
            y = _apply(kinds[-1], z, ws[-1])
        else:
            base = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            y = _apply(kinds[-1], z, ws[-1], base.view(m, rows, cols))
        ctx.save_for_backward(x2, weight, *ws)
        ctx.kinds, ctx.shape, ctx.out_dims, ctx.has_bias = kinds, shape, (rows, cols), bias is not None
        return y.view(m, rows * cols)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, *ws = ctx.saved_tensors
        kinds, (c, d) = ctx.kinds, ctx.shape
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_f = ctx.needs_input_grad[5:]
        m = x2.shape[0]
        dy = dy.contiguous()
        zs = [x2.view(m, c, d)]  # the input of each op, recomputed (never saved) where a factor needs it
        if any(need_f):
            for kind, w in zip(kinds[:-1], ws[:-1]):
                zs.append(_apply(kind, zs[-1], w))
        d_ws: list[Optional[Tensor]] = [None] * len(ws)
        dx = dy @ weight if need_x and weight is not None else None
        g = dy.view(m, *ctx.out_dims)  # the gradient of op k's output, walking back from the last op
        for k in range(len(ws) - 1, -1, -1):
            kind, w = kinds[k], ws[k]
            if need_f[k]:
                z = zs[k]
                d_ws[k] = (g.reshape(-1, g.shape[-1]).t() @ z.reshape(-1, z.shape[-1]) if kind == "R"
                           else _left_weight_grad(g, z))
            if k > 0 and (need_x or any(need_f[:k])):
                g = _input_grad(kind, g, w)
            elif k == 0 and need_x:
                dx = _input_grad(kind, g, w, None if dx is None else dx.view(m, c, d)).reshape(m, c * d)
            else:
                break
        d_weight = dy.t() @ x2 if need_w else None
        d_bias = dy.sum(0) if need_bias and ctx.has_bias else None
        return (dx, d_weight, d_bias, None, None, *d_ws)


def _split(f: Factor) -> list[Tensor]:
    """A factor as the chain's matrices in application order: a pair (a, b) applies b first."""
    return [f[1], f[0]] if isinstance(f, tuple) else [f]


def _full_shape(f: Factor) -> tuple[int, int]:
    return (f[0].shape[0], f[1].shape[1]) if isinstance(f, tuple) else tuple(f.shape)


def _check_factors(w1: Tensor, w2: Tensor, out: int, k: int) -> None:
    if w1.dim() != 2 or w2.dim() < 2:
        raise ValueError(f"LoKr factors must be w1 [a, c] and w2 [b, d, ...], got {tuple(w1.shape)}, {tuple(w2.shape)}")
    if w1.shape[0] * w2.shape[0] != out or w1.shape[1] * w2.shape[1] != k:
        raise ValueError(f"LoKr factors w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} do not factor this layer: "
                         f"need a*b = out ({out}) and c*d = in ({k})")


def _check_dims(a: int, b: int, c: int, d: int, k: int) -> None:
    if c * d != k:
        raise ValueError(f"LoKr factors W1 [{a}, {c}] and W2 [{b}, {d}] do not factor this layer: need c*d = in ({k})")


def lokr_linear(x: Tensor, w1: Factor, w2: Factor, scaling: float, row_scale: Optional[Tensor] = None,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b + s * x kron(W1, W2)^T for x [..., c d] (weight / bias None: the LoKr term only).

    w1 / w2 are full matrices [a, c] / [b, d] or low-rank pairs (w_a, w_b), kept split. row_scale [a b]
    multiplies the LoKr term's output features (rank_dropout); the base then runs apart from it.
    """
    (a, c), (b, d) = _full_shape(w1), _full_shape(w2)
    if isinstance(w1, tuple) or isinstance(w2, tuple):
        for f in (w1, w2):
            if isinstance(f, tuple) and (f[0].dim() != 2 or f[1].dim() != 2 or f[0].shape[1] != f[1].shape[0]):
                raise ValueError(f"a low-rank LoKr factor must be [p, r] x [r, q], got {tuple(f[0].shape)} x "
                                 f"{tuple(f[1].shape)}")
    else:
        _check_factors(w1, w2, a * b, x.shape[-1])
    _check_dims(a, b, c, d, x.shape[-1])
    if weight is not None and tuple(weight.shape) != (a * b, c * d):
        raise ValueError(f"the base weight {tuple(weight.shape)} does not match the LoKr factors: "
                         f"need ({a * b}, {c * d})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, c * d).contiguous()
    lefts, rights = _split(w1), _split(w2)
    left_pos = chain_order([tuple(w.shape) for w in lefts], [tuple(w.shape) for w in rights], c, d)
    chain = _interleave(lefts, rights, left_pos)
    smallest = 0  # the scaling goes on the smallest matrix, where it costs least (a loop: dynamo breaks on min(key=))
    for k in range(1, len(chain)):
        if chain[k][1].numel() < chain[smallest][1].numel():
            smallest = k
    ws = [(w * scaling if k == smallest else w).to(x.dtype) for k, (_, w) in enumerate(chain)]
    kinds = tuple(kind for kind, _ in chain)
    if row_scale is not None:
        y = _KronChain.apply(x2, None, None, kinds, (c, d), *ws) * row_scale.to(x.dtype)
        if weight is not None:
            y = y + torch.nn.functional.linear(x2, weight, bias)
    else:
        y = _KronChain.apply(x2, weight, bias, kinds, (c, d), *ws)
    return y.reshape(*lead, a * b)


def lokr_conv(x: Tensor, base: torch.nn.Module, w1: Tensor, w2: Tensor, scaling: float,
              row_scale: Optional[Tensor] = None) -> Tensor:
    """s * conv(x, kron(w1, w2)) for a base conv with groups == 1; w2 is the kernel factor [b, d, *k]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    _check_factors(w1, w2, base.out_channels, base.in_channels)
    if tuple(w2.shape[2:]) != tuple(base.kernel_size):
        raise ValueError(f"LoKr kernel factor {tuple(w2.shape)} does not match the conv kernel {base.kernel_size}")
    n, spatial = x.shape[0], x.shape[2:]
    xg = x.reshape(n * c, d, *spatial)  # channel (k, l) = k d + l: c groups of d channels
    t = base._conv_forward(xg, w2.to(x.dtype), None)  # [N c, b, *out spatial]
    out_spatial = t.shape[2:]
    y = (w1 * scaling).to(x.dtype) @ t.reshape(n, c, -1)  # mixes the c groups: [N, a, b * out spatial]
    y = y.reshape(n, a * b, *out_spatial)
    if row_scale is not None:
        y = y * row_scale.to(y.dtype).reshape(-1, *([1] * len(out_spatial)))
    return y
