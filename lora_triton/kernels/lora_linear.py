"""Launchers of the fused LoRA training kernels; same signatures as ``reference/lora_linear.py``.

``lora_linear_fwd`` / ``lora_linear_bwd`` run the fused path (``fused_fwd`` / ``fused_bwd``) or
the composed one (``composed.py``: base GEMMs on cuBLAS), as ``path_choice.pick`` says.

Forward: shrink (U = D(x) A^T) then base GEMM with the expand folded in (2 launches; the two
main GEMMs launch through ``gemm_launch``: persistent TMA kernels on sm_90+, pointer kernels else).
Backward: dU/dB from one pass over dy, dA = dU^T D(x), dx = dy W + D'(dU A) (3 launches,
dx skipped when not needed). The dropout mask is regenerated from the on-device seed in every
kernel that needs it; no mask or D(x) is ever stored.

On a GPU each kernel is autotuned (key: bucketed M, N, K, r, dtypes); under TRITON_INTERPRET=1
one small config runs so CPU tests stay fast.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import autotune as at
from . import gemm_launch as gl
from .lora_bwd import _da_kernel, _dudb_kernel
from .lora_fwd import _shrink_kernel

_MAX_R = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty(shape, dtype, device):
    # Single allocation point for outputs: tests patch it to NaN-fill and check every element is written.
    return torch.empty(shape, dtype=dtype, device=device)


_TENSOR_ARG = {"shrink": "x_ptr", "dudb": "dy_ptr", "da": "x_ptr"}


@functools.cache
def _tuned(name: str):
    kernel, family, reset = {
        "shrink": (_shrink_kernel, "shrink", None),
        "dudb": (_dudb_kernel, "dudb", ["db_ptr"]),
        "da": (_da_kernel, "da", None),
    }[name]
    tensor_arg = _TENSOR_ARG[name]
    key = ["M_BUCKET", "N", "K", "R"] if "N" in kernel.arg_names and "K" in kernel.arg_names else (
        ["M_BUCKET", "K", "R"] if "K" in kernel.arg_names else ["M_BUCKET", "N", "R"])
    return at.tuned(kernel, family, key, tensor_arg, reset_to_zero=reset)


def _launch(name: str, kernel, family: str, grid, *args, **kwargs):
    at.launch(kernel, family, _TENSOR_ARG[name], lambda: _tuned(name), grid, *args, **kwargs)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    """Programs wanted to fill the machine (a few per SM); small under the interpreter so
    the split paths get exercised by CPU tests."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _nominal(dim: str) -> int:
    """Block size used only to size split-K/split-M (the tuned config may differ: the kernels
    stride over blocks by the split count, so any config stays correct)."""
    if at.interpreting():
        return 32
    return {"M": 64, "K": 128}[dim]


def _split(programs: int, blocks: int, device) -> int:
    want = _target_programs(device)
    if programs >= want:
        return 1
    return max(1, min(blocks, want // max(programs, 1), 16))


def _check(x, weight, bias, lora_A, lora_B, dropout_p, seed):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; expected one of {_DTYPES}")
    m, k = x.shape
    r = lora_A.shape[0]
    n = lora_B.shape[0]
    if lora_A.shape != (r, k) or lora_B.shape != (n, r):
        raise ValueError(f"lora_A must be [r, {k}] and lora_B [N, r], got {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"rank must be in [1, {_MAX_R}], got {r}")
    if weight is not None and weight.shape != (n, k):
        raise ValueError(f"weight must be [{n}, {k}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    if dropout_p > 0.0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs seed: an int64 tensor [1] on x's device")
    # The kernels address rows with 32-bit offsets (row * stride); refuse what would wrap.
    reach = {"x": _last_offset(x), "weight": _last_offset(weight), "y / dy [M, N]": m * n - 1}
    big = {name: v for name, v in reach.items() if v >= _INT32_LIMIT}
    if big:
        raise ValueError(f"lora_triton's kernels use 32-bit element offsets; {sorted(big)} reach "
                         f"{max(big.values()) + 1} elements (limit 2**31): split the batch into chunks of "
                         f"fewer tokens (M={m}, K={k}, N={n})")
    return m, k, n, r


_INT32_LIMIT = 2**31


def _last_offset(t) -> int:
    """Offset of t's last element from its first (0 for None or empty tensors)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def shrink(x, lora_A, u, dropout_p: float, seed) -> None:
    """U = D(x) A^T into ``u`` [M, r] (x's dtype); split K over a strided set of blocks into an
    fp32 workspace when M gives too few programs."""
    m, k = x.shape
    r = lora_A.shape[0]
    dev = x.device
    drop = dropout_p > 0.0
    split = _split(triton.cdiv(m, _nominal("M")), triton.cdiv(k, _nominal("K")), dev)
    u_out = u if split == 1 else _empty((split, m, r), torch.float32, dev)
    us = (0, u.stride(0), u.stride(1)) if split == 1 else u_out.stride()
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), split)
    _launch("shrink", _shrink_kernel, "shrink", grid,
            x, lora_A, u_out, seed if drop else x, m, k, r, at.m_bucket(m),
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), *us,
            float(dropout_p), 1.0 / (1.0 - float(dropout_p)), split,
            R_PAD=_r_pad(r), HAS_DROPOUT=drop, IEEE=x.dtype == torch.float32)
    if split > 1:
        u.copy_(u_out.sum(0))


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    m, k, n, r = _check(x, weight, bias, lora_A, lora_B, dropout_p, seed)
    if m == 0:
        return _empty((m, n), x.dtype, x.device), _empty((m, r), x.dtype, x.device)
    from . import path_choice

    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if path_choice.pick("fwd", x, weight, lora_A, lora_B, dropout_p, args) == "composed":
        from . import composed

        return composed.lora_linear_fwd(*args)
    return fused_fwd(*args)


def fused_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """Shrink, then the base GEMM with the expand in its accumulator (2 launches)."""
    m, n, r = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    y = _empty((m, n), x.dtype, x.device)
    u = _empty((m, r), x.dtype, x.device)
    shrink(x, lora_A, u, dropout_p, seed)
    gl.fwd_gemm(x, weight, bias, u, lora_B, y, scaling, _r_pad(r), at.m_bucket(m))
    return y, u


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed,
                    need_dx: bool = True):
    """Returns (dx or None, dA [r, K] float32, dB [N, r] float32)."""
    m, k, n, r = _check(x, weight, None, lora_A, lora_B, dropout_p, seed)
    if dy.shape != (m, n) or u.shape != (m, r) or dy.dtype != x.dtype or u.dtype != x.dtype:
        raise ValueError(f"dy must be [{m}, {n}] and u [{m}, {r}] in {x.dtype}, "
                         f"got {tuple(dy.shape)} {dy.dtype}, {tuple(u.shape)} {u.dtype}")
    dev = x.device
    if m == 0:
        return (_empty((m, k), x.dtype, dev) if need_dx else None), torch.zeros(
            (r, k), dtype=torch.float32, device=dev), torch.zeros((n, r), dtype=torch.float32, device=dev)
    from . import path_choice

    # Without dx both paths launch the same two kernels (dU/dB, dA): nothing to choose.
    args = (dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if need_dx and path_choice.pick("bwd", x, weight, lora_A, lora_B, dropout_p, args) == "composed":
        from . import composed

        return composed.lora_linear_bwd(*args)
    return fused_bwd(*args)


def fused_bwd(dy, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed, need_dx: bool = True):
    """dU/dB, then the dgrad GEMM with D'(dU A) in its epilogue; dA in its own launch without
    dropout (or without dx), else from the dgrad epilogue's mask tiles (2 launches, one mask)."""
    m, k = x.shape
    dx = _empty((m, k), x.dtype, x.device) if need_dx else None
    fuse = need_dx and dropout_p > 0.0 and gl.fuse_da_ok(x.device, _r_pad(lora_A.shape[0]))
    d_u, d_a, d_b = dudb_da(dy, x, lora_B, u, scaling, dropout_p, seed, with_da=not fuse)
    if fuse:
        d_a = torch.zeros((lora_A.shape[0], k), dtype=torch.float32, device=x.device)
    if need_dx:
        gl.dgrad(dy, weight, d_u, lora_A, seed, dx, float(dropout_p), _r_pad(lora_A.shape[0]), at.m_bucket(m),
                 x=x if fuse else None, d_a=d_a if fuse else None)
    return dx, d_a, d_b


def dudb_da(dy, x, lora_B, u, scaling: float, p: float, seed, with_da: bool = True):
    """dU = s dy B [M, r] (x's dtype), dA fp32 [r, K] (None unless ``with_da``), dB fp32 [N, r]:
    the backward launches before dgrad, shared by the single-adapter and the grouped op."""
    m, k = x.shape
    n, r = lora_B.shape
    dev, dt = x.device, x.dtype
    r_pad, mb, ieee = _r_pad(r), at.m_bucket(m), dt == torch.float32
    drop = p > 0.0
    seed_arg = seed if drop else x
    # dU and dB. Several M tiles => fp32 atomics into dB (16 = the smallest BLOCK_M of any config).
    min_bm = at.interp_meta("dudb")["BLOCK_M"] if at.interpreting() else 16
    atomic = m > min_bm
    d_b = torch.zeros((n, r), dtype=torch.float32, device=dev) if atomic else _empty((n, r), torch.float32, dev)
    d_u = _empty((m, r), dt, dev)
    r_chunks = triton.cdiv(r_pad, 64)  # the dU/dB and dA kernels walk r in chunks of 64 over a grid axis
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), r_chunks)
    _launch("dudb", _dudb_kernel, "dudb", grid,
            dy, u, lora_B, d_u, d_b, m, n, r, mb,
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1),
            d_u.stride(0), d_u.stride(1), d_b.stride(0), d_b.stride(1),
            float(scaling), R_PAD=r_pad, ATOMIC=atomic, IEEE=ieee)
    if not with_da:
        return d_u, None, d_b
    # dA: split M into an fp32 workspace when K gives too few programs.
    split = _split(triton.cdiv(k, _nominal("K")), triton.cdiv(m, _nominal("M")), dev)
    d_a = _empty((r, k), torch.float32, dev)
    ws = d_a.unsqueeze(0) if split == 1 else _empty((split, r, k), torch.float32, dev)
    grid = lambda META: (triton.cdiv(k, META["BLOCK_K"]), split, r_chunks)
    _launch("da", _da_kernel, "da", grid,
            d_u, x, seed_arg, ws, m, k, r, mb,
            d_u.stride(0), d_u.stride(1), x.stride(0), x.stride(1), *ws.stride(),
            float(p), 1.0 / (1.0 - p), split, R_PAD=r_pad, HAS_DROPOUT=drop, IEEE=ieee)
    if split > 1:
        torch.sum(ws, 0, out=d_a)
    return d_u, d_a, d_b
