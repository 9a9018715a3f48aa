"""Pure-PyTorch 4-bit (NF4 / FP4) quantization in bitsandbytes' format, and the twin of ``kernels/nf4.py``.

Format (bitsandbytes 0.50, REFERENCE.md §5): W flattened row-major into blocks of ``blocksize``; each
block keeps an fp32 absmax; value / absmax goes to the nearest of 16 codes; flat element 2i sits in the
high nibble of byte i, 2i+1 in the low nibble; packed bytes are [ceil(numel/2), 1] uint8. Double quant
stores absmax - mean(absmax) blockwise (256) in 8 bits with the signed dynamic map, plus one fp32 absmax
per 256 absmaxes and the mean as ``offset``.

The quantizers reproduce bitsandbytes' CPU path bit for bit: 4-bit codes by midpoint bucketing of
``w * (1 / absmax)`` (``w / absmax`` in a trailing partial block), 8-bit codes by "largest code <= v, then
the right neighbour if strictly closer" on ``v = a / absmax``.

Dequantization works on flat ranges, so the GEMM twins below hold at most ``CHUNK_ELEMENTS`` (2^22)
dequantized values at a time (whole rows; more only when one row alone is longer), in a per-thread
scratch buffer reused from call to call: extra memory is bounded by 6 bytes per chunk element (fp32
values, an int32 index per packed byte: 24 MiB; +2 bytes for a 16-bit compute dtype's copy), each chunk's
product going straight into its slice of y or accumulating into dx, whatever the layer size; the
full-precision W is never built by the training path. The buffer is kept between calls (one per thread
and device, grown to the largest chunk seen). Why 2^22 (measured on a 2-core EPYC, fp32, 2048x2048,
2048 tokens): chunks of 2^18..2^22 take the same CPU time on an idle machine (L2-sized chunks win
nothing: the GEMM packs its operand anyway), but under load every chunk adds GEMM calls and parallel
regions that wait for a descheduled thread: 2^20 was 1.17x and 2^19 1.7x the CPU time of 2^22.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .philox import serial_cpu

# bitsandbytes' tables, in index order (its NF4 table is sorted; its FP4 table is in bit-pattern order).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
CHUNK_ELEMENTS = 1 << 22


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 fp32 code values of ``quant_type`` (index = nibble)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(_FP4_RAW, dtype=torch.float32, device=device) / 12.0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic map of double quantization (256 sorted fp32 values).

    Each of 7 decades 10^(e-6), e = 0..6, holds 2^e evenly spaced magnitudes (midpoints of a linspace
    over [0.1, 1]) with both signs; plus 0 and 1. This is the table stored as ``nested_quant_map``
    and used to decode; ``quantize_blockwise_8bit`` searches a copy whose first entry is pinned to -1,
    as bitsandbytes' CPU quantizer does.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        # the products are rounded to fp32, as bitsandbytes builds them
        values += ((10.0 ** (e - 6)) * mids).tolist() + ((-(10.0 ** (e - 6))) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _blocks(flat: torch.Tensor, blocksize: int):
    """(full blocks [n_full, blocksize], the trailing partial block or None)."""
    full = flat.numel() - flat.numel() % blocksize
    tail = flat[full:] if full < flat.numel() else None
    return flat[:full].view(-1, blocksize), tail


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/blocksize)]) of ``weight`` (any float dtype)."""
    _check_blocksize(blocksize)
    code = code_table(quant_type, weight.device)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    flat = weight.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("cannot quantize an empty weight")
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    # Chunks of whole blocks (an even count of elements): bounded temporaries on big weights.
    step = max(blocksize, CHUNK_ELEMENTS - CHUNK_ELEMENTS % blocksize)
    for start in range(0, n, step):
        part = flat[start:start + step]
        body, tail = _blocks(part, blocksize)
        amax = body.abs().amax(dim=1)
        scaled = (body * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
        if tail is not None:
            t_amax = tail.abs().amax().clamp(min=1e-38)
            amax = torch.cat([amax, t_amax.reshape(1)])
            scaled = torch.cat([scaled, (tail / t_amax).clamp_(-1, 1)])
        b0 = start // blocksize
        absmax[b0:b0 + amax.numel()] = amax
        if scaled.numel() % 2:  # the unused low nibble of an odd count encodes 0.0, as in bitsandbytes
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        idx = order[torch.bucketize(scaled, mids)].to(torch.uint8)
        pairs = idx.view(-1, 2)
        packed[start // 2:start // 2 + pairs.shape[0]] = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed.unsqueeze(1), absmax


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """(uint8 codes like ``values``, absmax fp32 per block): bitsandbytes' CPU 8-bit blockwise quantizer."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(nb * blocksize - n)]).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    normed = (padded / absmax.unsqueeze(1)).reshape(-1)[:n]
    search = code.clone()
    search[0] = -1.0  # the search table spans [-1, 1]; distances use the stored table
    left = (torch.searchsorted(search, normed, right=True) - 1).clamp_(0, code.numel() - 1)
    right = (left + 1).clamp_(max=code.numel() - 1)
    closer = (normed - code[right]).abs() < (normed - code[left]).abs()
    idx = torch.where(closer, right, left)
    idx.masked_fill_(normed.isnan(), 0)  # an all-zero block (0 / 0): bitsandbytes stores code 0
    return idx.to(torch.uint8).reshape(values.shape), absmax


def double_quantize(absmax: torch.Tensor):
    """(qabsmax uint8, nested_absmax fp32, nested_code fp32 [256], offset float) of a 4-bit absmax."""
    offset = absmax.mean()
    code = dynamic_map(absmax.device)
    q, nested = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return q, nested, code, float(offset)


def decode_absmax(absmax, nested_absmax=None, nested_code=None, offset: float = 0.0,
                  nested_blocksize: int = NESTED_BLOCKSIZE, start: int = 0, stop: Optional[int] = None):
    """fp32 absmax[start:stop]; a double-quantized absmax is decoded as code2[q] * absmax2[i // 256] + offset."""
    stop = absmax.numel() if stop is None else min(stop, absmax.numel())
    if nested_absmax is None:
        return absmax[start:stop].float()
    i0, i1 = start // nested_blocksize, (stop - 1) // nested_blocksize + 1
    scale = nested_absmax[i0:i1].repeat_interleave(nested_blocksize)[start - i0 * nested_blocksize:
                                                                     stop - i0 * nested_blocksize]
    return (nested_code[absmax[start:stop].long()] * scale).add_(offset)


def _build_pair_table(code: torch.Tensor) -> torch.Tensor:
    pairs = torch.stack((code.float().repeat_interleave(16), code.float().repeat(16)), dim=1)
    return pairs.contiguous().view(torch.int64).view(-1)


class _PairTables:
    """The pair tables of the code tables in use, most recent ``MAX_ENTRIES`` kept: a layer's GEMMs pass the
    same 16-entry code buffer on every call, so its table is built once, not three small ops per call.

    Keyed on the code tensor's device, dtype, storage address, layout and version counter (bumped by any
    in-place write, views included), never on its values: reading those would synchronize a GPU. An entry
    holds the code tensor itself, so its storage cannot be freed and the address reused while cached.
    """

    MAX_ENTRIES = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()  # key -> (code, table)

    def get(self, code: torch.Tensor) -> torch.Tensor:
        try:
            key = (code.device, code.dtype, code.data_ptr(), tuple(code.shape), code.stride(), code._version)
        except RuntimeError:  # an inference-mode tensor has no version counter: nothing to key a cache on
            return _build_pair_table(code)
        with self._lock:
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
                return held[1]
        table = _build_pair_table(code)
        with self._lock:
            self._entries[key] = (code, table)
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        return table

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_PAIR_TABLES = _PairTables()


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry b holds the fp32 pair (code[b >> 4], code[b & 15]) in memory order, so one 8-byte
    gather per packed byte writes both of its values (a [256, 2] fp32 table gathers 2-3x slower on CPU).
    Cached per code tensor (``_PairTables``); the result is shared: read it, never write it."""
    return _PAIR_TABLES.get(code)


class _Scratch(threading.local):
    """Per-thread reusable chunk buffers (the byte index and the dequantized pairs) of the GEMM twins:
    fresh multi-MiB buffers each call page-fault on every 4 KiB page. At most one chunk per thread and
    device: 12 bytes per byte pair, 6 per chunk element."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, n_bytes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = torch.device(device)
        held = self.buffers.get(key)
        if held is None or held[0].numel() < n_bytes:
            with torch.inference_mode(False):  # kept: a later call outside inference mode writes them in place
                held = (torch.empty(n_bytes, dtype=torch.int32, device=key),
                        torch.empty(n_bytes, dtype=torch.int64, device=key))
            self.buffers[key] = held
        return held[0][:n_bytes], held[1][:n_bytes]


_SCRATCH = _Scratch()


def dequantize_range(packed, absmax, code, blocksize: int, start: int, stop: int, dtype,
                     nested_absmax=None, nested_code=None, offset: float = 0.0, scratch: bool = False,
                     table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat elements [start, stop) of the dequantized weight (fp32 math, one rounding to ``dtype``).

    ``start`` must be a multiple of ``blocksize`` (so also even). ``scratch=True`` (the GEMM twins) returns
    fp32 values in this thread's reused chunk buffer: valid until the next scratch call, at most
    ``CHUNK_ELEMENTS`` values. ``table``: ``pair_table(code)``, when the caller already has it."""
    if start % blocksize:
        raise ValueError(f"start={start} must be a multiple of blocksize={blocksize}")
    flat = packed.reshape(-1)
    n = stop - start
    b = flat[start // 2:(stop + 1) // 2]
    table = pair_table(code) if table is None else table
    with serial_cpu(b.device, n):  # memory-bound passes: one thread under load (barriers stall on a loaded CPU)
        if scratch and b.numel() <= CHUNK_ELEMENTS // 2:
            index, pairs = _SCRATCH.get(b.numel(), b.device)
            torch.index_select(table, 0, index.copy_(b), out=pairs)
        else:
            pairs = table.index_select(0, b.int())
        vals = pairs.view(torch.float32)[:n]
        nb = -(-n // blocksize)
        amax = decode_absmax(absmax, nested_absmax, nested_code, offset, start=start // blocksize,
                             stop=start // blocksize + nb)
        full = n - n % blocksize
        vals[:full].view(-1, blocksize).mul_(amax[:full // blocksize].unsqueeze(1))
        if full < n:
            vals[full:].mul_(amax[-1])
        return vals.to(dtype)


def dequantize_4bit(packed, absmax, code, blocksize: int, shape, dtype, nested_absmax=None, nested_code=None,
                    offset: float = 0.0) -> torch.Tensor:
    """The whole dequantized weight of ``shape`` (what bitsandbytes' ``dequantize_4bit`` returns)."""
    n = math.prod(shape)
    return dequantize_range(packed, absmax, code, blocksize, 0, n, dtype, nested_absmax, nested_code,
                            offset).view(*shape)


class NF4Weight(NamedTuple):
    """A 4-bit weight [out_features, in_features] in bitsandbytes' layout (what the GEMMs read).

    absmax is fp32 [blocks], or uint8 codes when nested_absmax (fp32 [ceil(blocks/256)]) and
    nested_code (fp32 [256]) are given; offset is the double-quant mean."""
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    offset: float
    blocksize: int
    out_features: int
    in_features: int

    def rows(self, r0: int, r1: int, dtype, scratch: bool = False, table=None) -> torch.Tensor:
        """Rows [r0, r1) dequantized to ``dtype``; r0 * in_features must be a multiple of blocksize.
        ``scratch``/``table``: as in ``dequantize_range`` (the GEMM twins consume each chunk at once)."""
        k = self.in_features
        w = dequantize_range(self.packed, self.absmax, self.code, self.blocksize, r0 * k, r1 * k, dtype,
                             self.nested_absmax, self.nested_code, self.offset, scratch, table)
        return w.view(r1 - r0, k)

    def row_chunks(self):
        """Row ranges starting on block boundaries, each about CHUNK_ELEMENTS values."""
        k, bs = self.in_features, self.blocksize
        unit = bs // math.gcd(k, bs)
        rows = max(unit, (CHUNK_ELEMENTS // max(k, 1)) // unit * unit)
        for r0 in range(0, self.out_features, rows):
            yield r0, min(self.out_features, r0 + rows)


# -- the twin of kernels/nf4.py ------------------------------------------------------------------
# u = D(x) A^T [M, r] (the shrink, computed by the op) or None: no LoRA term.

def nf4_linear_fwd(x, weight: NF4Weight, bias, u, lora_B, scaling: float):
    """y = x deq(W)^T + bias + s u B^T [M, N] in x's dtype, dequantizing W a chunk of rows at a time."""
    chunks = list(weight.row_chunks())
    table = pair_table(weight.code)
    if len(chunks) == 1:  # the whole W fits one chunk: no output slices to copy
        w = weight.rows(0, weight.out_features, x.dtype, scratch=True, table=table)
        y = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
        return y if u is None else _add_lora(y, u, lora_B, scaling)
    y = torch.empty((x.shape[0], weight.out_features), dtype=x.dtype, device=x.device)
    for r0, r1 in chunks:
        w = weight.rows(r0, r1, x.dtype, scratch=True, table=table)
        if bias is None:
            torch.mm(x, w.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x, w.t(), out=y[:, r0:r1])
    return y if u is None else _add_lora(y, u, lora_B, scaling)


def _add_lora(y, u, lora_B, scaling):
    with serial_cpu(y.device, y.numel()):  # a rank-r GEMM: one thread under load
        return y.addmm_(u, lora_B.t(), alpha=scaling)


def nf4_linear_dgrad(dy, weight: NF4Weight, d_u, lora_A):
    """dx = dy deq(W) + d_u A [M, K] in dy's dtype (the LoRA term skipped when d_u is None)."""
    table = pair_table(weight.code)
    if d_u is None:
        dx = None
    else:
        with serial_cpu(dy.device, dy.shape[0] * lora_A.shape[1]):  # rank-r, written first: dgrad accumulates
            dx = d_u @ lora_A
    for r0, r1 in weight.row_chunks():
        w = weight.rows(r0, r1, dy.dtype, scratch=True, table=table)
        if dx is None:  # the first chunk's product initializes dx: no zero fill, no extra pass over it
            dx = dy[:, r0:r1] @ w
        else:
            dx.addmm_(dy[:, r0:r1], w)
    return dx
