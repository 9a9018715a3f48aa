"""``nf4_lora_linear``: a 4-bit (NF4/FP4) frozen base plus at most one LoRA adapter, differentiable.

The base GEMMs (forward y = x deq(W)^T + b + s U B^T and dgrad dx = dy deq(W) + dU A) run in the
implementation ``backend.implementation(device, "nf4")`` picks: the Triton kernels, which dequantize W
tiles inside their K-loop, or the chunked PyTorch twin. The rank-r parts (shrink U = D(x) A^T, dB, dU,
dA) are small matmuls done here in torch; the dropout mask is the Philox stream of
``reference/philox.py`` (bit-identical to the kernels'), regenerated in backward, never stored.

Saved for backward: x, U [M, r], the seed and the packed weight (already alive); no dequantized W.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.nf4 import BLOCKSIZES, NF4Weight
from ..reference.philox import dropout_keep_mask, serial_cpu
from .backend import implementation
from .checks import _shape, check_dropout_p, check_same_device, check_scaling, make_seed


def _impl(device: torch.device):
    return implementation(device, "nf4")


def _weight(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n_out, k) -> NF4Weight:
    return NF4Weight(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n_out, k)


@torch.library.custom_op("lora_triton::nf4_lora_fwd", mutates_args=())
def _fwd(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
         nested_code: Optional[Tensor], offset: float, blocksize: int, n_out: int, bias: Optional[Tensor],
         lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float, dropout_p: float,
         seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    w = _weight(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n_out, x.shape[1])
    if lora_A is None:
        return _impl(x.device).nf4_linear_fwd(x, w, bias, None, None, 0.0), x.new_empty((x.shape[0], 0))
    a = lora_A.to(x.dtype)
    with serial_cpu(x.device, x.numel()):  # a rank-r GEMM: one thread under load (a loaded CPU's barriers)
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
            u = ((x * keep) @ a.t()).mul_(1.0 / (1.0 - dropout_p))  # the 1/(1-p) scale on [M, r], not [M, K]
        else:
            u = x @ a.t()
    return _impl(x.device).nf4_linear_fwd(x, w, bias, u, lora_B.to(x.dtype), scaling), u


@_fwd.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n_out, bias, lora_A, lora_B,
      scaling, dropout_p, seed):
    r = 0 if lora_A is None else lora_A.shape[0]
    return x.new_empty((x.shape[0], n_out)), x.new_empty((x.shape[0], r))


@torch.library.custom_op("lora_triton::nf4_lora_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
         nested_code: Optional[Tensor], offset: float, blocksize: int, lora_A: Optional[Tensor],
         lora_B: Optional[Tensor], u: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
         need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty, dA fp32 or empty, dB fp32 or empty)."""
    w = _weight(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, dy.shape[1], x.shape[1])
    impl = _impl(x.device)

    def empty(dtype=x.dtype):  # a custom op's outputs may not alias each other: one fresh tensor each
        return x.new_empty(0, dtype=dtype)

    if lora_A is None:
        dx = impl.nf4_linear_dgrad(dy, w, None, None) if need_dx else empty()
        return dx, empty(torch.float32), empty(torch.float32)
    a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
    with serial_cpu(x.device, max(x.numel(), dy.numel())):  # the rank-r GEMMs: one thread under load
        d_b = (u.t() @ dy).mul_(scaling).t().contiguous()  # U^T dy: the NN-layout GEMM, then [N, r]
        d_us = (dy @ b) * scaling
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device) if dropout_p > 0.0 else None
        if keep is not None:
            d_us = d_us * (1.0 / (1.0 - dropout_p))
        d_a = d_us.t() @ (x if keep is None else x * keep)
    dx = empty()
    if need_dx:
        if keep is None:  # the LoRA term folds into the dgrad GEMM as r more columns of its K-loop
            dx = impl.nf4_linear_dgrad(dy, w, d_us, a)
        else:
            dx = impl.nf4_linear_dgrad(dy, w, None, None).add_((d_us @ a).mul_(keep))
    return dx, d_a.float(), d_b.float()


@_bwd.register_fake
def _(dy, x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, u, scaling,
      dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    if lora_A is None:
        return dx, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return dx, lora_A.new_empty(lora_A.shape, dtype=torch.float32), lora_B.new_empty(lora_B.shape,
                                                                                      dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, _n, _bias, lora_A, lora_B,
     scaling, dropout_p, seed) = inputs
    ctx.save_for_backward(x, packed, absmax, code, nested_absmax, nested_code, lora_A, lora_B, output[1], seed)
    ctx.offset, ctx.blocksize, ctx.scaling, ctx.dropout_p = offset, blocksize, scaling, dropout_p


def _backward(ctx, dy, _du):
    x, packed, absmax, code, nested_absmax, nested_code, lora_A, lora_B, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()
    dx, d_a, d_b = _bwd(dy, x, packed, absmax, code, nested_absmax, nested_code, ctx.offset, ctx.blocksize,
                        lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, need[0])
    d_bias = dy.sum(0) if need[9] else None
    d_a = d_a.to(lora_A.dtype) if lora_A is not None and need[10] else None
    d_b = d_b.to(lora_B.dtype) if lora_B is not None and need[11] else None
    return ((dx if need[0] else None), None, None, None, None, None, None, None, None, d_bias, d_a, d_b,
            None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_nf4_operands(x, weight: NF4Weight, bias, lora_A, lora_B, dropout_p: float, scaling: float = 1.0) -> None:
    n, k = weight.out_features, weight.in_features
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., in_features={k}], got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if weight.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {weight.blocksize}")
    numel, blocks = n * k, -(-n * k // weight.blocksize)
    if weight.packed.dtype != torch.uint8 or weight.packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed weight must be uint8 with ceil({n}*{k}/2)={(numel + 1) // 2} bytes, got "
                         f"{weight.packed.dtype} {_shape(weight.packed)}")
    nested = weight.nested_absmax is not None
    want = torch.uint8 if nested else torch.float32
    if weight.absmax.dtype != want or weight.absmax.numel() != blocks:
        raise ValueError(f"absmax must be {want} with {blocks} entries ({'double-quantized' if nested else 'plain'}),"
                         f" got {weight.absmax.dtype} {_shape(weight.absmax)}")
    if weight.code.shape != (16,) or weight.code.dtype != torch.float32:
        raise ValueError(f"code must be fp32 [16], got {weight.code.dtype} {_shape(weight.code)}")
    if nested and (weight.nested_code is None or weight.nested_code.shape != (256,)
                   or weight.nested_absmax.numel() != -(-blocks // 256)):
        raise ValueError(f"double quant needs nested_code fp32 [256] and nested_absmax [{-(-blocks // 256)}], got "
                         f"{_shape(weight.nested_code)} and {_shape(weight.nested_absmax)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [out_features={n}] in {x.dtype}, got {bias.dtype} {_shape(bias)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != k:
            raise ValueError(f"lora_A must be [r, in_features={k}], got {_shape(lora_A)}")
        if lora_B.shape != (n, lora_A.shape[0]):
            raise ValueError(f"lora_B must be [out_features={n}, r={lora_A.shape[0]}], got {_shape(lora_B)}")
        if not lora_A.is_floating_point() or not lora_B.is_floating_point():
            raise TypeError(f"lora_A, lora_B must be floating point, got {lora_A.dtype}, {lora_B.dtype}")
    check_dropout_p(dropout_p)  # the other ops' rules: "0.1" and True are TypeErrors, NaN a ValueError
    check_scaling(scaling)
    check_same_device({"x": x, "packed": weight.packed, "absmax": weight.absmax, "code": weight.code,
                       "nested_absmax": weight.nested_absmax, "nested_code": weight.nested_code, "bias": bias,
                       "lora_A": lora_A, "lora_B": lora_B})


def nf4_lora_linear(x: Tensor, weight: NF4Weight, bias: Optional[Tensor] = None, lora_A: Optional[Tensor] = None,
                    lora_B: Optional[Tensor] = None, scaling: float = 1.0, dropout_p: float = 0.0,
                    seed=None) -> Tensor:
    """y = x deq(W)^T + b + scaling * D(x) A^T B^T with W 4-bit; differentiable in x, A, B (and b).

    x: [..., K] in the compute dtype (W is dequantized to x's dtype); weight: an ``NF4Weight`` [N, K];
    bias [N] in x's dtype or None; lora_A [r, K], lora_B [N, r] in any float dtype (cast to x's, their
    gradients come back in their own dtype), or both None for the base alone.
    """
    check_nf4_operands(x, weight, bias, lora_A, lora_B, dropout_p, scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    p = float(dropout_p) if lora_A is not None else 0.0
    seed_t = make_seed(seed, x.device) if p > 0.0 else None
    y, _ = _fwd(x2, weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code,
                float(weight.offset), int(weight.blocksize), int(weight.out_features), bias, lora_A, lora_B,
                float(scaling), p, seed_t)
    return y.reshape(*lead, weight.out_features)
