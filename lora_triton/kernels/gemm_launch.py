"""Launchers of the two main GEMMs of the fused LoRA linear, shared by the single-adapter and the
grouped ops: ``fwd_gemm`` (y = x W^T + b + s U B^T) and ``dgrad`` (dx (+)= dy W + D'(dU A)).

Each picks between the persistent tensor-descriptor kernels (``lora_tma.py``; sm_90+, and the
interpreter, which runs descriptors on CPU tensors) and the pointer kernels (``lora_fwd.py`` /
``lora_bwd.py``; sm_80, ranks above 64, and operands a descriptor cannot address: inner
stride != 1, rows or bases not 16-byte aligned, no weight). Both compute the same thing; the choice is per call.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import autotune as at
from .lora_bwd import _dx_kernel
from .lora_fwd import _fwd_gemm_kernel
from .lora_tma import _dx_tma_kernel, _fwd_gemm_tma_kernel

# Above this padded rank the persistent kernels' U/B chunks no longer fit beside a 128-wide tile
# (r_pad 256: spills and serialized wgmma in the AOT report); the pointer kernels stay clean there.
MAX_TMA_R_PAD = 64
# Programs of a persistent launch under the interpreter: fewer than the tiles of most test
# shapes, so each program walks several tiles as on a GPU.
_INTERP_PROGRAMS = 3


def tma_device(device: torch.device) -> bool:
    """Whether the descriptor kernels run on ``device`` (tests patch this to force the pointer path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return at.interpreting()


def fuse_da_fits(cc_major: int, r_pad: int) -> bool:
    """Whether the masked dgrad epilogue may also compute dA (FUSE_DA) without spilling: sm_90 AOT
    at r_pad 16-256 shows none (200-255 registers); sm_80 spills 512 bytes from r_pad 64 on."""
    return cc_major >= 9 or r_pad <= 32


def fuse_da_ok(device: torch.device, r_pad: int) -> bool:
    """FUSE_DA for a dgrad launch on ``device`` (the interpreter checks it on every shape)."""
    if device.type != "cuda":
        return True
    return fuse_da_fits(torch.cuda.get_device_capability(device)[0], r_pad)


def _desc_ok(t) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit inner stride, 16-byte aligned rows and base."""
    es = t.element_size()
    return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _weight_desc(w):
    """(tensor for the descriptor, W_KN) for a [N, K] weight, or None: a row-major weight as is, a
    transposed view (GPT-2 Conv1D) through its [K, N] storage."""
    if _desc_ok(w):
        return w, False
    if _desc_ok(w.t()):
        return w.t(), True
    return None


def _set_blocks(nargs):
    """Block shapes of the descriptors for the config in ``nargs`` (also the autotuner's pre_hook)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if "x_desc" in nargs:
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]
        nargs["y_desc"].block_shape = [bm, bn // nargs["EPI_SPLIT"]]
    else:
        nargs["dy_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk] if nargs["W_KN"] else [bk, bn]
        nargs["dx_desc"].block_shape = [bm, bn // nargs["EPI_SPLIT"]]


@functools.cache
def _tuned(name: str, accumulate: bool = False, fuse_da: bool = False):
    # tensor_arg: a pointer argument in the operands' dtype (the pruner reads its element size).
    kernel, family, tensor_arg = {
        "fwd": (_fwd_gemm_kernel, "gemm", "x_ptr"),
        "dx": (_dx_kernel, "gemm", "dy_ptr"),
        "fwd_tma": (_fwd_gemm_tma_kernel, "gemm_tma", "u_ptr"),
        "dx_tma": (_dx_tma_kernel, "gemm_tma", "du_ptr"),
    }[name]
    # Timing runs repeat the launch: dx accumulated into (ACCUMULATE) is restored after each, dA
    # summed by atomics (FUSE_DA) zeroed before each and before the real run. One autotuner per
    # combination, so a dummy pointer is never zeroed.
    return at.tuned(kernel, family, ["M_BUCKET", "N", "K", "R"], tensor_arg,
                    pre_hook=_set_blocks if family == "gemm_tma" else None,
                    reset_to_zero=["da_ptr"] if fuse_da else None,
                    restore_value=["dx_ptr"] if accumulate else None)


def _launch(name: str, kernel, family: str, grid, esize: int, *args, **kwargs):
    named = dict(zip(kernel.arg_names, args), **kwargs)
    if at.interpreting() or not at.autotune_enabled():
        if at.interpreting():
            meta = at.interp_meta(family)
            launch = dict(meta)
        else:
            cfg = at.select_config(family, esize, named["R_PAD"], named["M_BUCKET"],
                                   bool(named.get("HAS_DROPOUT", False)))
            meta = cfg.kwargs
            launch = dict(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if family == "gemm_tma":
            _set_blocks(dict(named, **meta))
        kernel[grid](*args, **kwargs, **launch)
    else:
        _tuned(name, bool(kwargs.get("ACCUMULATE", False)), bool(kwargs.get("FUSE_DA", False)))[grid](*args, **kwargs)


@functools.lru_cache(maxsize=8)
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERP_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_grid(m: int, n: int, device):
    progs = _programs(device)
    return lambda META: (min(progs, triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"])),)


def _desc(t):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [16, 16])  # block shape set per config (_set_blocks)


def fwd_gemm(x, weight, bias, u, lora_B, y, scaling: float, r_pad: int, m_bucket: int) -> str:
    """y = x W^T + b + s U B^T into ``y`` (fresh, contiguous). Returns the kernel kind that ran."""
    m, k = x.shape
    n, r = lora_B.shape
    ieee = x.dtype == torch.float32
    wd = _weight_desc(weight) if weight is not None else None
    b = bias if bias is not None else x
    if wd is not None and r_pad <= MAX_TMA_R_PAD and tma_device(x.device) and _desc_ok(x) and _desc_ok(y):
        w_t, w_kn = wd
        _launch("fwd_tma", _fwd_gemm_tma_kernel, "gemm_tma", _persistent_grid(m, n, x.device), x.element_size(),
                _desc(x), _desc(w_t), _desc(y), b, u, lora_B, m, n, k, r, m_bucket,
                u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1), float(scaling),
                R_PAD=r_pad, W_KN=w_kn, HAS_BIAS=bias is not None, IEEE=ieee, EPI_SPLIT=2)
        return "tma"
    w = weight if weight is not None else x
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)
    _launch("fwd", _fwd_gemm_kernel, "gemm", grid, x.element_size(),
            x, w, b, u, lora_B, y, m, n, k, r, m_bucket,
            x.stride(0), x.stride(1),
            weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
            u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            float(scaling), R_PAD=r_pad, HAS_W=weight is not None, HAS_BIAS=bias is not None, IEEE=ieee)
    return "pointer"


def dgrad(dy, weight, d_u, lora_A, seed, dx, p: float, r_pad: int, m_bucket: int, accumulate: bool = False,
          x=None, d_a=None) -> str:
    """dx (+)= dy W + D'(dU A) (dU already scaled); ``seed`` is used only when p > 0. With p > 0,
    ``x`` and a zeroed fp32 ``d_a`` [r, K], the epilogue also adds dU^T D(x) into d_a from the mask
    tiles it generates anyway (FUSE_DA). Returns the kernel kind that ran."""
    m, k = dx.shape
    n = dy.shape[1]
    r = lora_A.shape[0]
    drop = p > 0.0
    fuse_da = drop and d_a is not None
    xs = (x.stride(0), x.stride(1)) if fuse_da else (0, 0)
    das = (d_a.stride(0), d_a.stride(1)) if fuse_da else (0, 0)
    x_arg, da_arg = (x, d_a) if fuse_da else (dy, dy)
    seed_arg = seed if drop else dy
    inv_keep = 1.0 / (1.0 - p)
    ieee = dx.dtype == torch.float32
    wd = _weight_desc(weight) if weight is not None else None
    if wd is not None and r_pad <= MAX_TMA_R_PAD and tma_device(dy.device) and _desc_ok(dy) and _desc_ok(dx):
        w_t, w_kn = wd
        _launch("dx_tma", _dx_tma_kernel, "gemm_tma", _persistent_grid(m, k, dy.device), dy.element_size(),
                _desc(dy), _desc(w_t), _desc(dx), d_u, lora_A, seed_arg, dx, x_arg, da_arg, m, n, k, r, m_bucket,
                d_u.stride(0), d_u.stride(1), lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
                *xs, *das, float(p), inv_keep, R_PAD=r_pad, W_KN=w_kn, HAS_DROPOUT=drop, IEEE=ieee, EPI_SPLIT=2,
                ACCUMULATE=accumulate, FUSE_DA=fuse_da)
        return "tma"
    w = weight if weight is not None else dy
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_N"]),)
    _launch("dx", _dx_kernel, "gemm", grid, dy.element_size(),
            dy, w, d_u, lora_A, seed_arg, dx, x_arg, da_arg, m, n, k, r, m_bucket,
            dy.stride(0), dy.stride(1),
            weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
            d_u.stride(0), d_u.stride(1), lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
            *xs, *das, float(p), inv_keep, R_PAD=r_pad, HAS_W=weight is not None, HAS_DROPOUT=drop, IEEE=ieee,
            ACCUMULATE=accumulate, FUSE_DA=fuse_da)
    return "pointer"
