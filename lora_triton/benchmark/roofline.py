"""Analytic FLOP and byte counts of each op, and the device ceilings they are compared with.

The byte counts are the *ideal* traffic: every operand read once and every result written once
(what a perfectly fused kernel moves). All providers of a case are judged against the same
model, so "fraction of roofline" says how close each one gets to the minimum work:
roofline time = max(flops / peak FLOP/s, bytes / peak bandwidth); fraction = that / measured.
The extra traffic of the unfused PyTorch composition is modelled separately (``unfused_extra_bytes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class OpCost:
    flops: float
    bytes: float

    def __add__(self, other: OpCost) -> OpCost:
        return OpCost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Ceilings:
    """Measured peaks of one device and dtype: dense matmul FLOP/s and device-copy bytes/s."""

    flops_per_s: float
    bytes_per_s: float
    matmul_n: int
    copy_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def base_linear_cost(m: int, k: int, n: int, elem: int, mode: str) -> OpCost:
    """Frozen y = x W^T (the floor). fwd+bwd adds dgrad dx = dy W (no weight gradient)."""
    _check_mode(mode)
    cost = OpCost(2.0 * m * n * k, elem * (m * k + n * k + m * n))
    if mode == "fwd+bwd":
        cost = cost + OpCost(2.0 * m * n * k, elem * (m * n + n * k + m * k))
    return cost


def lora_linear_cost(m: int, k: int, n: int, r: int, elem: int, mode: str) -> OpCost:
    """y = x W^T + s D(x) A^T B^T; backward gives dx, dA, dB with W frozen (REFERENCE.md §1).

    Forward: base GEMM + shrink (2mkr) + expand (2mnr); reads x, W, A, B, writes y and, when
    training, U [m, r]. Backward: dgrad (2mnk) + dB and dU (2mnr each) + dA and the LoRA part of
    dx (2mkr each); reads dy, W, x (for dA), A, B, U; writes dx, dA, dB.
    """
    _check_mode(mode)
    adapter = r * k + n * r
    fwd_bytes = m * k + n * k + adapter + m * n + (m * r if mode == "fwd+bwd" else 0)
    cost = OpCost(2.0 * m * n * k + 2.0 * m * k * r + 2.0 * m * n * r, elem * fwd_bytes)
    if mode == "fwd+bwd":
        bwd_bytes = m * n + n * k + m * k + 2 * adapter + m * r + m * k + adapter
        cost = cost + OpCost(2.0 * m * n * k + 4.0 * m * n * r + 4.0 * m * k * r, elem * bwd_bytes)
    return cost


def unfused_extra_bytes(m: int, k: int, n: int, r: int, elem: int, mode: str, dropout_p: float) -> float:
    """Traffic the PEFT composition base(x) + B(A(drop(x))) * s moves beyond ``lora_linear_cost``.

    Each op is its own kernel. Forward: dropout reads x and writes D(x) and a mask (counted at
    element size), the shrink reads D(x) (without dropout: re-reads x); the expand writes an
    [m, n] temporary, the scaling reads it and writes another, the add reads y and that and writes
    the sum: 6 extra [m, n] passes. Backward: the scaling's backward reads dy and writes a
    temporary that dU and dB each read (4 [m, n]); dx_lora is written and summed into dx (3 [m, k]),
    and dropout's backward reads it with the mask and writes it again (3 [m, k]).
    Terms in r are ignored: they are tiny next to these.
    """
    _check_mode(mode)
    extra = 6 * m * n + (3 * m * k if dropout_p > 0 else m * k)
    if mode == "fwd+bwd":
        extra += 4 * m * n + 3 * m * k + (3 * m * k if dropout_p > 0 else 0)
    return float(elem * extra)


def multi_lora_cost(tokens: int, k: int, n: int, token_ranks: list[int], adapter_ranks: list[int], elem: int,
                    include_base: bool = True) -> OpCost:
    """Mixed-batch forward: token t uses an adapter of rank token_ranks[t]; adapter_ranks lists the
    distinct adapters touched (each read once). Without the base GEMM (``include_base=False``)
    the op accumulates into y, so y is read and written.
    """
    lora_flops = sum(2.0 * rt * (k + n) for rt in token_ranks)
    adapter_bytes = sum(ra * (k + n) for ra in adapter_ranks)
    if include_base:
        return OpCost(2.0 * tokens * n * k + lora_flops, elem * (tokens * k + n * k + adapter_bytes + tokens * n))
    return OpCost(lora_flops, elem * (tokens * k + adapter_bytes + 2 * tokens * n))


def roofline_seconds(cost: OpCost, ceilings: Ceilings) -> float:
    return max(cost.flops / ceilings.flops_per_s, cost.bytes / ceilings.bytes_per_s)


def measure_ceilings(device: torch.device, dtype: torch.dtype, repeats: int = 5, matmul_n: int | None = None,
                     copy_bytes: int | None = None) -> Ceilings:
    """Peak dense-matmul FLOP/s and copy bandwidth, measured once per run (best of ``repeats``).

    Sizes: CUDA 8192^3 matmul and a 1 GiB copy (far beyond L2); CPU 1536^3 and 256 MiB
    (large enough to leave the caches, small enough to take well under a second).
    """
    from .timing import time_callable  # local: timing imports this module's users

    cuda = device.type == "cuda"
    mm_n = matmul_n or (8192 if cuda else 1536)
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (256 << 20))
    t_mm = _best_matmul(mm_n, device, dtype, repeats, time_callable)
    t_copy = _best_copy(copy_bytes, device, repeats, time_callable)
    return Ceilings(flops_per_s=2.0 * mm_n**3 / t_mm, bytes_per_s=2.0 * copy_bytes / t_copy,
                    matmul_n=mm_n, copy_bytes=copy_bytes)


def _best_matmul(n, device, dtype, repeats, timer) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return min(timer(lambda _i: torch.mm(a, b), device, repeats=repeats, warmup=2))


def _best_copy(nbytes, device, repeats, timer) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return min(timer(lambda _i: dst.copy_(src), device, repeats=repeats, warmup=2))
