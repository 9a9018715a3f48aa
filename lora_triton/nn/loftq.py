"""LoftQ initialisation (``LoraConfig(init_lora_weights="loftq", loftq_config={...})``) on any device.

PEFT's algorithm: res = W; repeat loftq_iter times: Q = quant(res), res = W - deq(Q), rank-r SVD
res = U S Vh, L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r, res = W - L R. quant is NF4 (blocksize 64, no double
quant) for ``loftq_bits=4``, bitsandbytes' LLM.int8 row-wise quantization (round(w * 127 / absmax(row)) of
the fp16 weight, as PEFT's ``Int8Params``) for ``loftq_bits=8``. torch.linalg.svd, no scipy, no CUDA
requirement (PEFT's LoftQ runs on CUDA/XPU only, and its 8-bit path cannot run on CPU).

Targets: Linear / GPT-2 Conv1D at 4 bits get our 4-bit storage of the last Q as base (PEFT writes deq(Q)
back in full precision and expects the user to reload in 4 bits). Embedding and Conv1d/2d/3d (PEFT
crashes on both: its embedding and conv layers call ``loftq_init`` without the config) and every 8-bit
target keep a full-precision base holding deq(Q), as PEFT does: lora_triton has no 4-bit Embedding / Conv
storage and no 8-bit one. A conv's weight is factored as [out, in * kernel] (PEFT's conv delta is
lora_B [out, r] times lora_A [r, in * kernel]); an embedding's E [num, dim] as A^T B^T (lora_embedding_A
[r, num], lora_embedding_B [dim, r]).

Difference from PEFT: the layer computes deq(Q) + s B A with s = lora_alpha / r (or / sqrt(r)), so we set
B = L / sqrt(s), A = R / sqrt(s) and s B A = L R for any alpha. PEFT sets B = L, A = R, exact only when
s = 1. ``loftq_config={"peft_identical": True}`` reproduces PEFT's factors (for comparisons).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter_layer import AdapterLayer
from .lora_conv import CONV_TYPES, LoraConv
from .lora_embedding import LoraEmbedding
from .lora_linear import LoraLinear, is_conv1d
from .nf4_linear import NF4Linear

LOFTQ_KEYS = ("loftq_bits", "loftq_iter", "peft_identical")
LOFTQ_BITS = (4, 8)
LOFTQ_BLOCKSIZE = 64


def check_loftq_config(cfg, use_dora: bool = False) -> None:
    """``use_dora`` is accepted: the magnitude is initialised after LoftQ, from ||deq(Q) + s B A|| (PEFT's order)."""
    if not isinstance(cfg, dict) or not cfg:
        raise ValueError(f"init_lora_weights='loftq' needs loftq_config={{'loftq_bits': 4, 'loftq_iter': N}}, "
                         f"got {cfg!r}")
    unknown = sorted(set(cfg) - set(LOFTQ_KEYS))
    if unknown:
        raise ValueError(f"loftq_config keys must be among {LOFTQ_KEYS}, got unknown {unknown}")
    if cfg.get("loftq_bits", 4) not in LOFTQ_BITS:
        raise ValueError(f"loftq_bits must be one of {LOFTQ_BITS} (NF4 or int8, as in PEFT), got {cfg['loftq_bits']!r}")
    n_iter = cfg.get("loftq_iter", 1)
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"loftq_iter must be an int >= 1, got {n_iter!r}")


def int8_rowwise_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """fp32 deq(Q) of bitsandbytes' LLM.int8 row-wise quantization of ``weight`` [rows, cols]: the weight in
    fp16 (``Int8Params`` casts it), q = round(w * (127 / absmax(row))), deq = q * absmax * (1 / 127)."""
    a = weight.to(torch.float16)
    stats = a.abs().amax(dim=1).float()
    q = torch.round(a * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
    return q * stats.view(-1, 1) * 7.874015718698502e-3


def _low_rank(res: torch.Tensor, r: int):
    """(L [out, r], R [r, in]) with L R the best rank-r approximation of res."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def loftq(weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, peft_identical: bool = False,
          quant_type: str = "nf4", blocksize: int = LOFTQ_BLOCKSIZE, compute_dtype=None, history=None, bits: int = 4):
    """(Q, lora_A [r, in] fp32, lora_B [out, r] fp32) for ``weight`` [out, in]; Q is an NF4Linear without
    bias at ``bits=4``, the fp32 deq(Q) tensor at ``bits=8``.

    deq(Q) + scaling * B A approximates weight (deq(Q) + B A with peft_identical). ``history``: a list that
    receives ||W - (deq(Q) + L R)||_F / ||W||_F after each iteration (what num_iter = 1, 2, ... return)."""
    if bits not in LOFTQ_BITS:
        raise ValueError(f"bits must be one of {LOFTQ_BITS}, got {bits!r}")
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"LoftQ factors a 2-D weight [out, in], got {tuple(w.shape)}")
    if r > min(w.shape):
        raise ValueError(f"LoftQ rank r={r} exceeds min(out, in)={min(w.shape)} of a {tuple(w.shape)} weight")
    res = w
    for _ in range(num_iter):
        if bits == 4:
            q = NF4Linear.from_weight(res, None, quant_type, blocksize, double_quant=False,
                                      compute_dtype=compute_dtype or weight.dtype)
            deq = q.dequantize(torch.float32)
        else:
            q = deq = int8_rowwise_dequantized(res)
        left, right = _low_rank(w - deq, r)
        res = w - left @ right
        if history is not None:
            history.append((torch.linalg.matrix_norm(res - deq) / torch.linalg.matrix_norm(w)).item())
    if not peft_identical:
        root = math.sqrt(scaling)
        left, right = left / root, right / root
    return q, right.contiguous(), left.contiguous()


def reconstruction_error(weight: torch.Tensor, q, lora_A, lora_B, scaling: float) -> float:
    """||W - (deq(Q) + s B A)||_F / ||W||_F; ``q`` an NF4Linear or a dequantized tensor."""
    w = weight.detach().float()
    deq = q.dequantize(torch.float32) if isinstance(q, NF4Linear) else q.float()
    approx = deq + scaling * lora_B.float() @ lora_A.float()
    return (torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w)).item()


def _kind(module: nn.Module) -> str:
    if isinstance(module, (NF4Linear, LoraLinear, AdapterLayer)):
        raise TypeError(f"LoftQ quantizes a full-precision layer itself; got {type(module).__name__} "
                        "(apply LoftQ to the unquantized model, as the first adapter)")
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module) in CONV_TYPES:
        if module.groups != 1:
            raise NotImplementedError(f"LoftQ on a {type(module).__name__} with groups={module.groups}: its LoRA "
                                      "delta is not one [out, r] x [r, in * kernel] product")
        return "conv"
    raise TypeError(f"LoftQ supports nn.Linear / Conv1D / nn.Embedding / nn.Conv1d-3d targets, got "
                    f"{type(module).__name__}")


def loftq_layer(module: nn.Module, adapter_name: str, args: tuple, loftq_config: dict) -> nn.Module:
    """The LoRA layer over the LoftQ-quantized base of a full-precision Linear / Conv1D / Embedding / Conv,
    its adapter set: a LoraLinear over an NF4Linear (4-bit Linear), else the layer's own LoRA type over the
    module holding deq(Q) (a new Parameter: the transaction of ``inject_lora`` rolls it back on failure)."""
    kind = _kind(module)
    r, alpha, dropout, rslora, _init, lora_bias, use_dora = args
    bits = loftq_config.get("loftq_bits", 4)
    weight = module.weight.detach()
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if kind == "linear":
        matrix = weight.t() if is_conv1d(module) else weight
    elif kind == "embedding":
        matrix = weight  # [num, dim] = A^T B^T: the factors swap roles below
    else:
        matrix = weight.flatten(1)  # [out, in * kernel]
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    q, right, left = loftq(matrix, r, scaling, loftq_config.get("loftq_iter", 1),
                           bool(loftq_config.get("peft_identical", False)), compute_dtype=dtype, bits=bits)
    if kind == "linear" and bits == 4:  # the 4-bit NF4Linear itself is the base
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
        base = q
    else:  # the module keeps its type, holding deq(Q)
        deq = q.dequantize(torch.float32) if isinstance(q, NF4Linear) else q
        deq = deq.t() if is_conv1d(module) else deq
        module.weight = nn.Parameter(deq.reshape(weight.shape).to(weight.dtype), requires_grad=False)
        base = module
    if kind == "linear":
        layer = LoraLinear(base, adapter_name, r, alpha, dropout, rslora, False, lora_bias, use_dora)
        factors = {layer.lora_A[adapter_name].weight: right, layer.lora_B[adapter_name].weight: left}
    elif kind == "embedding":
        layer = LoraEmbedding(base, adapter_name, r, alpha, rslora, False, lora_bias, use_dora)
        factors = {layer.lora_embedding_A[adapter_name]: left.t(), layer.lora_embedding_B[adapter_name]: right.t()}
    else:
        layer = LoraConv(base, adapter_name, r, alpha, dropout, rslora, False, lora_bias, use_dora)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        factors = {a: right.reshape(a.shape), b: left.reshape(b.shape)}
    layer.train(module.training)
    with torch.no_grad():
        for param, value in factors.items():
            param.copy_(value)
    variant = layer.lora_variant.get(adapter_name)
    if variant is not None:  # DoRA: the magnitude of the LoftQ-initialised weight, deq(Q) + s B A
        variant.init(layer, adapter_name)
    return layer
