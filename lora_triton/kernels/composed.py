"""The composed path of the LoRA training linear: the safety net that never loses to cuBLAS.

The two big GEMMs run on cuBLAS through torch (``torch.addmm`` / ``torch.mm``), the LoRA term
through our side kernels, so this path costs the frozen base plus small, bandwidth-bound extras
whatever our GEMMs manage on a given GPU:

forward   U = D(x) A^T               our shrink kernel (mask in-kernel, as in the fused path)
          y = x W^T + b              cuBLAS (addmm with the bias)
          y += s U B^T               cuBLAS addmm_ in place (beta = 1: one read-modify-write of y)
backward  dU = s dy B, dB = s dy^T U our dU/dB kernel (one pass over dy)
          dx = dy W                  cuBLAS
          dx += D'(dU A)             our masked dgrad kernel without the weight (HAS_W = False,
                                     ACCUMULATE: reads dx, adds the masked low-rank term, writes);
                                     with dropout it also adds dA = dU^T D(x) from its mask tiles
                                     (FUSE_DA), else dA is our dA kernel

Same signatures and results as the fused path (``lora_linear.fused_fwd`` / ``fused_bwd``); the
mask stream is the same, so either path can run forward and the other backward.
Under TRITON_INTERPRET=1 torch's CPU GEMMs stand in for cuBLAS (how the CPU tests run it).
"""

from __future__ import annotations

import torch

from . import autotune as at
from . import gemm_launch as gl
from .lora_linear import _empty, _r_pad, dudb_da, shrink


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    m, n, r = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    u = _empty((m, r), x.dtype, x.device)
    shrink(x, lora_A, u, dropout_p, seed)
    if weight is None:
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device) if bias is None else bias.expand(m, n).clone()
    elif bias is None:
        y = torch.mm(x, weight.t())
    else:
        y = torch.addmm(bias, x, weight.t())
    y.addmm_(u, lora_B.t(), alpha=float(scaling))
    return y, u


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed,
                    need_dx: bool = True):
    m, k = x.shape
    # dA from the masked kernel's mask tiles, as on the fused path.
    fuse = need_dx and dropout_p > 0.0 and gl.fuse_da_ok(x.device, _r_pad(lora_A.shape[0]))
    d_u, d_a, d_b = dudb_da(dy, x, lora_B, u, scaling, dropout_p, seed, with_da=not fuse)
    dx = None
    if need_dx:
        if weight is None:
            dx = _empty((m, k), x.dtype, x.device)
        else:
            dx = torch.mm(dy, weight)
        if fuse:
            d_a = torch.zeros((lora_A.shape[0], k), dtype=torch.float32, device=x.device)
        gl.dgrad(dy, None, d_u, lora_A, seed, dx, float(dropout_p), _r_pad(lora_A.shape[0]), at.m_bucket(m),
                 accumulate=weight is not None, x=x if fuse else None, d_a=d_a if fuse else None)
    return dx, d_a, d_b
