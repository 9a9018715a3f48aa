"""Timers and memory probes.

Every callable takes the index of the input set to use, so inputs rotate between calls.
CUDA: events around each call, with a 256 MiB buffer zeroed before each one so operands come
from HBM, not L2 (the zeroing also runs ahead of the call and hides launch latency, as in
``triton.testing.do_bench``); events are resolved after one synchronize at the end. Small decode
cases replay CUDA graphs (``capture_graphs``). CPU: ``time.perf_counter`` around each call.
Providers are interleaved (round i runs every provider once, starting at a different one each
round) so clock drift, thermal state and background load hit them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

Call = Callable[[int], Any]

_L2_FLUSH_BYTES = 256 << 20


class _CudaSampler:
    def __init__(self, device: torch.device):
        self.flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        self.pending: list[tuple[str, Any, Any]] = []

    def sample(self, name: str, fn: Call, i: int) -> None:
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        self.pending.append((name, start, end))

    def resolve(self, out: dict[str, list[float]]) -> None:
        torch.cuda.synchronize()
        for name, start, end in self.pending:
            out[name].append(start.elapsed_time(end) / 1e3)
        self.pending.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_interleaved(fns: dict[str, Call], device: torch.device, repeats: int, warmup: int,
                        n_sets: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call for each provider, ``repeats`` samples each, after ``warmup`` untimed rounds.
    ``clock`` times CPU calls (e.g. ``time.thread_time`` for the calling thread's CPU time); CUDA calls
    are timed with events whatever it is."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for w in range(warmup):
        for name in names:
            fns[name](w % n_sets)
    _sync(device)
    out: dict[str, list[float]] = {name: [] for name in names}
    sampler = _CudaSampler(device) if device.type == "cuda" else None
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, i = fns[name], rep % n_sets
            if sampler is not None:
                sampler.sample(name, fn, i)
            else:
                t0 = clock()
                fn(i)
                out[name].append(clock() - t0)
    if sampler is not None:
        sampler.resolve(out)
    return out


def time_callable(fn: Call, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    return measure_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def saved_tensor_bytes(fn: Call, i: int, exclude: list[torch.Tensor]) -> int:
    """Bytes saved for backward by ``fn`` beyond ``exclude`` (inputs and parameters, alive anyway).

    Counted once per storage via ``saved_tensors_hooks``: deterministic, and exactly what a
    training step keeps alive per layer until its backward runs.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(i)
    return sum(seen.values())


def cuda_peak_bytes(fn: Call, i: int, device: torch.device) -> int:
    """Peak bytes allocated during one call beyond what was allocated before it (outputs included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(i)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def capture_graphs(fn: Call, n_sets: int, device: torch.device) -> Call:
    """One CUDA graph per input set; returns a callable replaying graph i. Raises if capture fails
    (e.g. the callable synchronizes with the host), so the caller can fall back to eager."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside capture: allocator pools, lazy init, autotune
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = []
    for i in range(n_sets):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append(graph)
    return lambda i: graphs[i % n_sets].replay()
