"""LoftQ initialisation (``LoraConfig(init_lora_weights="loftq", loftq_config={...})``) on any device.

PEFT's algorithm: res = W; repeat loftq_iter times: Q = NF4(res) (blocksize 64, no double quant),
res = W - deq(Q), rank-r SVD res = U S Vh, L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r, res = W - L R. The base
becomes our 4-bit storage of the last Q (PEFT writes deq(Q) back in full precision and expects the user to
reload in 4 bits); torch.linalg.svd, no scipy, no CUDA requirement.

Difference from PEFT: the layer computes deq(Q) + s B A with s = lora_alpha / r (or / sqrt(r)), so we set
B = L / sqrt(s), A = R / sqrt(s) and s B A = L R for any alpha. PEFT sets B = L, A = R, exact only when
s = 1. ``loftq_config={"peft_identical": True}`` reproduces PEFT's factors (for comparisons).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora_linear import LoraLinear, is_conv1d
from .nf4_linear import NF4Linear

LOFTQ_KEYS = ("loftq_bits", "loftq_iter", "peft_identical")
LOFTQ_BLOCKSIZE = 64


def check_loftq_config(cfg, use_dora: bool = False) -> None:
    if use_dora:
        raise NotImplementedError("init_lora_weights='loftq' with use_dora=True: DoRA on a 4-bit base is not supported")
    if not isinstance(cfg, dict) or not cfg:
        raise ValueError(f"init_lora_weights='loftq' needs loftq_config={{'loftq_bits': 4, 'loftq_iter': N}}, "
                         f"got {cfg!r}")
    unknown = sorted(set(cfg) - set(LOFTQ_KEYS))
    if unknown:
        raise ValueError(f"loftq_config keys must be among {LOFTQ_KEYS}, got unknown {unknown}")
    if cfg.get("loftq_bits", 4) != 4:
        raise NotImplementedError(f"loftq_bits={cfg['loftq_bits']!r}: lora_triton's quantized base is 4-bit only")
    n_iter = cfg.get("loftq_iter", 1)
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"loftq_iter must be an int >= 1, got {n_iter!r}")


def _low_rank(res: torch.Tensor, r: int):
    """(L [out, r], R [r, in]) with L R the best rank-r approximation of res."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def loftq(weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, peft_identical: bool = False,
          quant_type: str = "nf4", blocksize: int = LOFTQ_BLOCKSIZE, compute_dtype=None, history=None):
    """(NF4Linear without bias holding Q, lora_A [r, in] fp32, lora_B [out, r] fp32) for ``weight`` [out, in].

    deq(Q) + scaling * B A approximates weight (deq(Q) + B A with peft_identical). ``history``: a list that
    receives ||W - (deq(Q) + L R)||_F / ||W||_F after each iteration (what num_iter = 1, 2, ... return)."""
    w = weight.detach().float()
    if r > min(w.shape):
        raise ValueError(f"LoftQ rank r={r} exceeds min(out, in)={min(w.shape)} of a {tuple(w.shape)} weight")
    res = w
    for _ in range(num_iter):
        q = NF4Linear.from_weight(res, None, quant_type, blocksize, double_quant=False,
                                  compute_dtype=compute_dtype or weight.dtype)
        deq = q.dequantize(torch.float32)
        left, right = _low_rank(w - deq, r)
        res = w - left @ right
        if history is not None:
            history.append((torch.linalg.matrix_norm(res - deq) / torch.linalg.matrix_norm(w)).item())
    if not peft_identical:
        root = math.sqrt(scaling)
        left, right = left / root, right / root
    return q, right.contiguous(), left.contiguous()


def reconstruction_error(weight: torch.Tensor, q: NF4Linear, lora_A, lora_B, scaling: float) -> float:
    """||W - (deq(Q) + s B A)||_F / ||W||_F."""
    w = weight.detach().float()
    approx = q.dequantize(torch.float32) + scaling * lora_B.float() @ lora_A.float()
    return (torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w)).item()


def loftq_layer(module: nn.Module, adapter_name: str, args: tuple, loftq_config: dict) -> LoraLinear:
    """A LoraLinear over the LoftQ-quantized base of a full-precision Linear / Conv1D, its adapter set."""
    if isinstance(module, (NF4Linear, LoraLinear)) or not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"LoftQ quantizes a full-precision nn.Linear / Conv1D itself; got {type(module).__name__} "
                        "(apply LoftQ to the unquantized model, as the first adapter)")
    r, alpha, dropout, rslora, _init, lora_bias = args
    weight = module.weight.detach()
    weight = weight.t() if is_conv1d(module) else weight
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    q, lora_a, lora_b = loftq(weight, r, scaling, loftq_config.get("loftq_iter", 1),
                              bool(loftq_config.get("peft_identical", False)), compute_dtype=dtype)
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    q.train(module.training)
    layer = LoraLinear(q, adapter_name, r, alpha, dropout, rslora, False, lora_bias)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(lora_a)
        layer.lora_B[adapter_name].weight.copy_(lora_b)
    return layer
