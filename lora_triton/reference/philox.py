"""Philox4x32-10 in PyTorch, bit-identical to Triton's ``tl.randint4x`` / ``tl.rand``.

Dropout masks are a pure function of (seed, offset), so the reference path, the
Triton kernels, forward and backward all regenerate the same mask without ever
storing it.

The mask stream of a [rows, K] input: row i is cut into G = ceil(K / 8) groups of 8
columns; group g draws ``tl.randint4x(seed, i * G + g)`` (int64 counter) and column
j = 8g + l takes 16 bits of it: word ``l >> 1``, low half for even l, high half for odd l.
It is kept when those bits are >= ``dropout_threshold(p)``. Groups never straddle rows,
so a kernel tile whose columns start at a multiple of 8 runs one Philox per 8 elements,
and so does this reference: the mask costs an eighth of a Philox call per element.

Why the generator looks the way it does (CPU: every aten op costs a pass over memory):
uint32 words live in int64 tensors; one int64 multiply gives both halves of a 32x32-bit
product (low word: its low 32 bits, high word: ``>> 32``), so a round is 2 multiplies.
Only the two words that feed the next multiply are masked to 32 bits; the other two carry
garbage above bit 31 that no later step reads. Round keys are Python ints for CPU seeds
(no 0-d tensor ops), every op runs in place on buffers reused across row chunks, the last
round writes the four words interleaved as int32 [counters, 4], and the 16-bit halves become
keep flags by arithmetic on one contiguous int16 view of them (``keep_flags``; sign bit flipped
by an XOR folded into the last round), which is already the mask's [rows, 8 G] layout.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterator

import torch

from ..env_vars import env

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_FLIP16 = 0x80008000  # the sign bits of both 16-bit halves: unsigned compare via a signed int16 view
# Triton's uint_to_uniform_float scale for 32-bit words.
_UNIFORM_SCALE = 4.6566127342e-10
# Philox counters per row chunk on CPU. Above ATen's 32768-element grain each op of the chunk runs on the
# intra-op threads, and fewer chunks pay the ~100 ops' fixed cost fewer times; the generator's buffers (64
# bytes a counter, ``generator``) are kept per thread, so a large chunk page-faults once, not per call.
# Measured (2026-12-01 15:55Z, load 0.6, 2 threads, p=0.1 fp32 mask, median of 7, cached buffers):
# 2048 x 1024 7.11 / 5.81 / 4.20 / 3.60 / 3.52 ms for 2^14 .. 2^18, 2048 x 2048 13.78 / 11.30 / 8.23 / 6.88 /
# 6.29 ms; 2^17 holds 8 MiB per thread against 16 MiB for 2^18's last few percent.
_CHUNK = 1 << 17
# Masks of at most this many counters (256K elements, 1 MiB in fp32) are small: ``mask_memo`` keeps them
# from forward to backward. Never more than ``_CHUNK`` (a kept mask must come in one chunk).
SMALL_MASK_COUNTERS = 1 << 15
# Elements of the largest operand per intra-op thread in ``few_threads``: 16 MB of fp32 is 1-2 ms of one
# core's bandwidth, enough to amortize the barrier a parallel op ends in.
_THREAD_GRAIN = 1 << 22
# Changing torch's thread count costs 40-600 us here (OpenMP and MKL re-plan their teams): a block whose
# largest operand is smaller than this runs on the caller's threads (such small ops mostly run inline
# anyway: torch's parallel grain is 32K elements).
_TOGGLE_MIN = 1 << 18


def round_keys(seed: torch.Tensor | int, device=None) -> list[tuple]:
    """The 10 (k0, k1) round keys of a seed.

    Python ints for int seeds and CPU tensors (reading a CPU tensor costs no sync); 0-d int64
    tensors for a seed on an accelerator, so the reference never syncs the device for it.
    """
    if isinstance(seed, torch.Tensor) and seed.device.type != "cpu":
        return tensor_round_keys(seed)
    s = int(seed.reshape(()).item()) if isinstance(seed, torch.Tensor) else int(seed)
    lo, hi = s & _MASK32, (s >> 32) & _MASK32
    return [((lo + i * _KEY_A) & _MASK32, (hi + i * _KEY_B) & _MASK32) for i in range(10)]


def tensor_round_keys(seed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``round_keys`` as 0-d int64 tensors on the seed's device (no host read of the seed)."""
    k0, k1 = _key_columns(seed.to(dtype=torch.int64).reshape(1))
    return list(zip(k0.view(10).unbind(), k1.view(10).unbind()))


def batch_round_keys(seeds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 10 rounds' (k0, k1) of G seeds as [G, 1] CPU int64 tensors (a batched ``_Philox.run``'s keys):
    ``round_keys`` per seed, stacked."""
    g = len(seeds)
    k0, k1 = _key_columns(torch.tensor(seeds, dtype=torch.int64))
    return list(zip(k0.view(10, g, 1).unbind(0), k1.view(10, g, 1).unbind(0)))


# Round i's key words are (lo + i * KEY_A, hi + i * KEY_B) mod 2**32 (``round_keys``): from [10, 1] int64
# columns the keys of a seed tensor are a few tensor ops (exact in int64). CPU's columns are built once.
_CPU_KEY_STEPS = (torch.arange(10, dtype=torch.int64).view(10, 1) * _KEY_A,
                  torch.arange(10, dtype=torch.int64).view(10, 1) * _KEY_B)


def _key_columns(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1) of the 10 rounds of int64 ``seeds`` [G], as [10, G] tensors on the seeds' device."""
    if seeds.device.type == "cpu":
        step_a, step_b = _CPU_KEY_STEPS
    else:
        steps = torch.arange(10, dtype=torch.int64, device=seeds.device).view(10, 1)
        step_a, step_b = steps * _KEY_A, steps * _KEY_B
    k0 = torch.add(step_a, seeds & _MASK32).bitwise_and_(_MASK32)
    k1 = torch.add(step_b, seeds.bitwise_right_shift(32).bitwise_and_(_MASK32)).bitwise_and_(_MASK32)
    return k0, k1


class _Philox:
    """Reused buffers for up to ``n`` counters; ``run`` returns the 4 words as int32 [..., 4]."""

    def __init__(self, n: int, device):
        self.n = n
        self.buf = torch.empty((6, n), dtype=torch.int64, device=device)
        self.words = torch.empty((n, 4), dtype=torch.int32, device=device)

    def run(self, counters: torch.Tensor, keys, flip16: bool = False, below_2_32: bool = False) -> torch.Tensor:
        """Philox4x32-10 of int64 ``counters`` (flat, or [G, n'] with keys broadcasting as [G, 1] tensors; <= n
        in all). Returns the words [*counters.shape, 4] as int32 bit patterns (a view of a reused buffer).
        ``flip16`` XORs every word with 0x80008000 (for the int16 compare).

        The last round writes its four words straight into the [..., 4] layout, so the 16-bit halves of
        counter c sit at int16 positions 8c .. 8c + 7 in lane order (2 * word + half): the mask compare then
        reads them in one contiguous pass (per-word strided copies cost 10x the compare, measured).
        ``below_2_32``: the caller knows every counter is below 2**32 (``_folded_start``)."""
        n = counters.numel()
        c0, c1, c2, c3, pa, pb = (b[:n].view(counters.shape) for b in self.buf)  # [n] or [G, n]
        out = self.words[:n].view(*counters.shape, 4)
        if below_2_32 and len(keys) > 3 and (isinstance(keys[0][0], int) or keys[0][0].device.type == "cpu"):
            c0, c1, c2, c3, pa, pb = _folded_start(counters, keys, c0, c1, c2, c3, pa, pb)
            start = 3
        else:
            k0, k1 = keys[0]
            # Round 1 with c2 = c3 = 0 (umulhi(B, 0) = 0 and B * 0 = 0), so c1 becomes 0.
            torch.bitwise_and(counters, _MASK32, out=c3)
            torch.mul(c3, _ROUND_A, out=pa)
            torch.bitwise_right_shift(counters, 32, out=c0)
            c0 ^= k0
            c0 &= _MASK32
            torch.bitwise_right_shift(pa, 32, out=c2)
            c2 ^= k1
            c2 &= _MASK32
            c3, pa = pa, c3  # lo(A * c0) is pa; c3's old buffer becomes free
            start = 1
        last = len(keys) - 1
        for i, (k0, k1) in enumerate(keys[start:], start):
            if flip16 and i == last:
                k0, k1 = k0 ^ _FLIP16, k1 ^ _FLIP16
            torch.mul(c0, _ROUND_A, out=pa)  # A * c0: lo -> new c3, hi -> new c2
            torch.mul(c2, _ROUND_B, out=pb)  # B * c2: lo -> new c1, hi -> new c0
            torch.bitwise_right_shift(pb, 32, out=c0)
            if i > 1:  # c1 is 0 after round 1
                c0 ^= c1
            torch.bitwise_right_shift(pa, 32, out=c2)
            c2 ^= c3
            if i < last:  # c0, c2 feed the next round's multiplies
                c0 ^= k0
                c2 ^= k1
                c0 &= _MASK32
                c2 &= _MASK32
            else:  # the int64 -> int32 cast of the output keeps bits 0..31
                torch.bitwise_xor(c0, k0, out=out[..., 0])
                torch.bitwise_xor(c2, k1, out=out[..., 2])
            c1, pb = pb, c1
            c3, pa = pa, c3
        if flip16:
            torch.bitwise_xor(c1, _FLIP16, out=out[..., 1])
            torch.bitwise_xor(c3, _FLIP16, out=out[..., 3])
        else:
            out[..., 1].copy_(c1)
            out[..., 3].copy_(c3)
        return out


def _folded_start(counters, keys, c0, c1, c2, c3, pa, pb):
    """Rounds 1-3 for counters below 2**32, with the constants folded: the counter's high word is 0, so
    after round 1 c0 is the key k0 and c1 is 0, after round 2 c3 is lo(A * k0): Python ints (or, for a
    batch of seeds, [G, 1] CPU tensors), 8 fewer full-size ops than the general rounds. Returns the buffers as
    (c0, c1, c2, c3, pa, pb) in the main loop's roles after round 3."""
    (k0a, k1a), (k0b, k1b), (k0c, k1c) = keys[0], keys[1], keys[2]
    # Round 1: c0 = counter (clean), c1 = c2 = c3 = 0 -> c0' = k0a, c1' = 0, c2' = hi(A ctr) ^ k1a, c3' = pa.
    torch.mul(counters, _ROUND_A, out=pa)
    torch.bitwise_right_shift(pa, 32, out=c2)
    c2 ^= k1a
    c2 &= _MASK32
    # Round 2: A * c0' is the Python int A * k0a: c0'' = hi(B c2') ^ k0b, c1'' = pb,
    # c2'' = hi(A k0a) ^ c3' ^ k1b, c3'' = lo(A k0a).
    prod = _ROUND_A * k0a
    torch.mul(c2, _ROUND_B, out=pb)
    torch.bitwise_right_shift(pb, 32, out=c0)
    c0 ^= k0b
    c0 &= _MASK32
    torch.bitwise_xor(pa, ((prod >> 32) & _MASK32) ^ k1b, out=c2)
    c2 &= _MASK32
    # Round 3: c0''' = hi(B c2'') ^ c1'' ^ k0c, c2''' = hi(A c0'') ^ c3'' ^ k1c; the products land in pa and c1.
    torch.mul(c0, _ROUND_A, out=pa)
    torch.mul(c2, _ROUND_B, out=c1)
    torch.bitwise_right_shift(c1, 32, out=c0)
    c0 ^= pb
    c0 ^= k0c
    c0 &= _MASK32
    torch.bitwise_right_shift(pa, 32, out=c2)
    c2 ^= (prod & _MASK32) ^ k1c
    c2 &= _MASK32
    return c0, c1, c2, pa, c3, pb  # c1 = lo(B c2''), c3 = lo(A c0''); the old c3 and pb buffers are free


_cached = threading.local()


def generator(n: int, device) -> _Philox:
    """A ``_Philox`` for ``n`` counters. On CPU, for at most ``_CHUNK`` counters, one per thread reused across
    calls (its 64 bytes a counter stay held, 8 MiB at most): fresh buffers page-faulted on every call, ~0.3 ms
    of a tiny Llama step's single batched mask call (2026-12-01 profile). ``run``'s words are read before the
    next ``run``, so interleaved mask iterators of one thread can share it. Elsewhere a fresh one."""
    device = torch.device(device)
    if device.type != "cpu" or n > _CHUNK:
        return _Philox(n, device)
    gen = getattr(_cached, "gen", None)
    if gen is None or gen.n < n:
        with torch.inference_mode(False):  # kept: a later call outside inference mode writes it in place
            gen = _cached.gen = _Philox(n, device)
    return gen


def philox4x32(seed: torch.Tensor | int, offsets: torch.Tensor, keys=None) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 (``tl.randint4x``); uint32 values held in int64.

    ``keys`` (from ``round_keys``) saves recomputing them when one seed serves many chunks.
    """
    offsets = offsets.to(torch.int64)
    keys = round_keys(seed, offsets.device) if keys is None else keys
    flat = offsets.reshape(-1)
    words = generator(flat.numel(), offsets.device).run(flat, keys)
    return tuple((words[:, i].to(torch.int64) & _MASK32).reshape(offsets.shape) for i in range(4))


def philox_randint(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first Philox word."""
    return philox4x32(seed, offsets)[0]


def philox_rand(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1), equal bit for bit to ``tl.rand(seed, offsets)``."""
    word = philox_randint(seed, offsets)
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_threshold(p: float) -> int:
    """16-bit threshold of the mask stream, computed in fp32 exactly as the kernels do."""
    return _threshold(float(p))


@functools.lru_cache(maxsize=256)
def _threshold(p: float) -> int:
    # Remembered: it builds and reads a tensor (a few us), and a training step asks for the same few p's
    # dozens of times.
    p32 = torch.tensor(p, dtype=torch.float32)
    return int(p32 * 65536.0 + 0.5)


# What the thread helpers return for a small block: one shared no-op context, so a small layer's call pays
# no generator-based context manager (a few us each, several per call: 2026-12-01 tiny-Llama profile).
_UNCHANGED = contextlib.nullcontext()


def serial_cpu(device, numel: int | None = None):
    """Runs the block's CPU ops on one intra-op thread (torch's thread count restored after).

    The masked chunk loops issue hundreds of small ops; each parallel one ends in a barrier, and on a
    loaded machine a barrier waits for whichever worker was descheduled (measured: 3-5x the base layer's
    time at load 13 on 2 cores, against 1.2x on one thread). The large GEMMs outside stay parallel.
    ``numel`` (the block's largest operand) below ``_TOGGLE_MIN`` leaves the thread count alone.
    """
    if numel is not None and numel < _TOGGLE_MIN:
        return _UNCHANGED
    return _cpu_threads(device, 1)


def few_threads(device, numel: int):
    """Runs the block (rank-r GEMMs) on one intra-op thread per ``_THREAD_GRAIN`` elements of its largest
    operand, ``numel``, at most torch's count: a [2048, 1024] x [1024, 16] GEMM took 16-24 ms on two
    threads at load 2-3 on 2 cores, against 1 ms on one. Below ``_TOGGLE_MIN`` nothing changes."""
    if numel < _TOGGLE_MIN:
        return _UNCHANGED
    return _cpu_threads(device, max(1, numel // _THREAD_GRAIN))


_POLICIES = ("auto", "fewer", "all")
_load_seen = [0.0, False]  # (when, oversubscribed) of the last load-average read


def _oversubscribed() -> bool:
    """Whether fewer intra-op threads should run: ``LORA_TRITON_CPU_THREADS`` = "fewer" always, "all" never,
    "auto" (default) when the 1-minute load average is above the core count (read at most once a second).

    Measured on 2 cores (docs/benchmarks.md): on a quiet machine the thread toggles cost time (2048 wide,
    p=0.1: 1.30x the frozen layer parallel vs 1.28-1.41x toggled, 1024 p=0 1.12-1.14x vs 1.15-1.16x); under
    load 2-13 a barrier waits for a descheduled worker and one thread is 3-20x faster for these blocks."""
    policy = env("LORA_TRITON_CPU_THREADS", "auto").strip().lower() or "auto"
    if policy not in _POLICIES:
        raise ValueError(f"LORA_TRITON_CPU_THREADS must be one of {', '.join(_POLICIES)}, got {policy!r}")
    if policy != "auto":
        return policy == "fewer"
    now = time.monotonic()
    if now - _load_seen[0] > 1.0:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: behave as on a quiet machine
            load = 0.0
        _load_seen[:] = [now, load > (os.cpu_count() or 1)]
    return _load_seen[1]


@contextlib.contextmanager
def _cpu_threads(device, want: int):
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or want >= threads or not _oversubscribed():
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def keep_buffers(shape, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, levels) for ``keep_flags``: ``out`` in ``dtype``; ``levels`` the fp32 buffer the arithmetic
    runs in when ``dtype`` cannot hold it exactly (every int16 is exact in fp32 and fp64), else None."""
    out = torch.empty(shape, dtype=dtype, device=device)
    exact = dtype in (torch.float32, torch.float64)
    return out, None if exact else torch.empty(shape, dtype=torch.float32, device=device)


def keep_flags(words: torch.Tensor, out: torch.Tensor, levels: torch.Tensor | None, thr16) -> None:
    """Writes the keep flags (1 kept, 0 dropped) of ``flip16`` Philox ``words`` (``_Philox.run``'s int32
    [..., 4]) into ``out`` [..., G, 4, 2] (lane 2 * word + half), ``thr16`` = threshold - 32768 (a number,
    or a tensor broadcasting to ``out``).

    The 16-bit halves become 0/1 by arithmetic, not by a compare: torch.ge into a float tensor builds a
    bool temporary and casts it (measured: 58% of the generator's time, 2048 x 2048). ``levels`` (from
    ``keep_buffers``) is where that runs for an inexact ``out`` dtype; None runs it in ``out``."""
    lv = out if levels is None else levels
    lv.copy_(words.view(torch.int16).view(lv.shape))  # little endian: half 0 is bits 0..15
    # Integers h: h - (thr - 1) >= 1 exactly when h >= thr, <= 0 otherwise, so the clamp gives 1 or 0.
    lv.sub_(thr16 - 1).clamp_(0, 1)
    if levels is not None:
        out.copy_(levels)


def small_mask_counters() -> int:
    """The largest mask (in Philox counters) ``mask_memo`` keeps: one chunk at most."""
    return min(SMALL_MASK_COUNTERS, _CHUNK)


def keep_mask_chunks(seed: torch.Tensor | int, rows: int, cols: int, p: float, device=None,
                     dtype: torch.dtype = torch.bool, row_offset: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (r0, r1, keep) for consecutive row chunks: keep [r1 - r0, cols] in ``dtype`` (1 = kept,
    0 = dropped) for rows row_offset + r0 .. row_offset + r1 - 1 of the mask stream.

    On CPU the chunk holds about ``_CHUNK`` counters and its buffers are reused by the next chunk:
    use (or copy) each chunk before advancing. Elsewhere the whole mask comes in one chunk.
    """
    if rows == 0 or cols == 0:
        return
    if isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
    device = torch.device(device or "cpu")
    thr16 = dropout_threshold(p) - 32768  # the unsigned 16-bit compare on sign-flipped halves
    keys = round_keys(seed, device)
    groups = -(-cols // 8)
    step = max(1, _CHUNK // groups) if device.type == "cpu" else rows
    step = min(step, rows)
    gen = generator(step * groups, device)
    gidx = torch.arange(groups, device=device, dtype=torch.int64)
    counters = torch.empty((step, groups), dtype=torch.int64, device=device)
    out, levels = keep_buffers((step, groups, 4, 2), dtype, device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        ridx = torch.arange(row_offset + r0, row_offset + r1, device=device, dtype=torch.int64)
        cnt = counters[:n]
        torch.add(gidx[None, :], ridx[:, None], alpha=groups, out=cnt)
        words = gen.run(cnt.reshape(-1), keys, flip16=True, below_2_32=(row_offset + r1) * groups <= 1 << 32)
        keep_flags(words, out[:n], None if levels is None else levels[:n], thr16)
        yield r0, r1, out[:n].view(n, groups * 8)[:, :cols]


def dropout_keep_mask(
    seed: torch.Tensor | int, rows: int, cols: int, p: float, device=None, row_offset: int = 0
) -> torch.Tensor:
    """Boolean keep mask [rows, cols] of the mask stream (module docstring), for rows
    row_offset .. row_offset + rows - 1 of an input with ``cols`` columns."""
    if isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
    keep = torch.empty((rows, cols), dtype=torch.bool, device=device)
    with serial_cpu(keep.device, rows * cols):
        for r0, r1, chunk in keep_mask_chunks(seed, rows, cols, p, device, torch.bool, row_offset):
            keep[r0:r1] = chunk
    return keep


def apply_dropout(x: torch.Tensor, seed: torch.Tensor | int, p: float, keep: torch.Tensor | None = None):
    """D(x) = x * mask / (1 - p) for a 2-D x, mask regenerated from the seed (or given)."""
    if p == 0.0:
        return x
    if keep is not None:
        return x * keep * (1.0 / (1.0 - p))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with serial_cpu(x.device, x.numel()):
        for r0, r1, chunk in keep_mask_chunks(seed, x.shape[0], x.shape[1], p, x.device, x.dtype):
            torch.mul(x[r0:r1], chunk, out=out[r0:r1])
    return out.mul_(1.0 / (1.0 - p))
