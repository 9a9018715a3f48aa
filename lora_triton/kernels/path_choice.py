"""Which path runs a training linear on the Triton backend: fused or composed (``composed.py``).

``LORA_TRITON_PATH=fused|composed`` forces one (``ops.backend.requested_path``). ``auto`` (the
default) decides per key, the first time the key is met on a GPU, by timing both paths on the
call's own inputs (a warm-up call each, which also runs their autotuning, then ``_REPS`` timed
calls each, CUDA events, median), and keeps the faster. Keys: op (fwd / bwd), dtype, bucketed M,
N, K, padded r, dropout on/off, weight present. Decisions are cached in memory and in a JSON file
per GPU name (``$LORA_TRITON_CACHE_DIR``, default ``~/.cache/lora_triton``), like autotune
results, so later processes on the same GPU model skip the measurement.

Where no measurement can run the fused path is used without one: under the interpreter (CPU
timings say nothing about a GPU), and during CUDA graph capture (timing would synchronize).
The measured times stay in the cache file (``us``) for ``bench/device_check.sh`` to print.
"""

from __future__ import annotations

import json
import os
import statistics
import threading

import torch

from ..io.atomic import atomic_write_text
from ..ops.backend import requested_path
from . import autotune as at
from .lora_linear import _r_pad  # the kernels' padding: one key per compiled R_PAD

_REPS = 5
_LOCK = threading.Lock()
_MEMO: dict[str, dict] = {}  # GPU name -> {key: {"path": ..., "us": {...}}}


def cache_file(gpu: str) -> str:
    root = os.environ.get("LORA_TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lora_triton")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in gpu)
    return os.path.join(root, f"paths-{safe}.json")


def key(op: str, x, weight, lora_A, lora_B, dropout_p: float) -> str:
    m, k = x.shape
    return (f"{op}|{str(x.dtype).removeprefix('torch.')}|M{at.m_bucket(m)}|N{lora_B.shape[0]}|K{k}|r{_r_pad(lora_A.shape[0])}"
            f"|p{int(dropout_p > 0.0)}|w{int(weight is not None)}")


def _decisions(gpu: str) -> dict:
    if gpu not in _MEMO:
        try:
            with open(cache_file(gpu), encoding="utf-8") as f:
                _MEMO[gpu] = dict(json.load(f))
        except (OSError, ValueError):
            _MEMO[gpu] = {}
    return _MEMO[gpu]


def _record(gpu: str, k: str, entry: dict) -> None:
    table = _decisions(gpu)
    table[k] = entry
    try:
        atomic_write_text(cache_file(gpu), json.dumps(table, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home keeps the decision for this process only


def _cuda_time_us(fn) -> float:
    fn()  # warm-up: compiles and autotunes
    times = []
    for _ in range(_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def decide(gpu: str, k: str, runners: dict, timer=_cuda_time_us) -> str:
    """The cached decision for ``k`` on ``gpu``, or measure each runner (name -> no-arg callable)
    with ``timer`` and cache the fastest."""
    with _LOCK:
        hit = _decisions(gpu).get(k)
        if hit is not None:
            return hit["path"]
        us = {name: float(timer(fn)) for name, fn in runners.items()}
        best = min(us, key=us.get)
        _record(gpu, k, {"path": best, "us": {name: round(t, 2) for name, t in us.items()}})
        return best


def pick(op: str, x, weight, lora_A, lora_B, dropout_p: float, args: tuple = ()) -> str:
    """'fused' or 'composed' for this call. ``args``: the call's arguments after ``op``'s
    signature (fwd: x, weight, bias, A, B, s, p, seed; bwd: dy, x, weight, A, B, u, s, p, seed, need_dx),
    used only when an auto decision has to be measured."""
    requested = requested_path()
    if requested != "auto":
        return requested
    if x.device.type != "cuda" or at.interpreting() or not args or torch.cuda.is_current_stream_capturing():
        return "fused"
    from . import composed
    from . import lora_linear as ll

    fns = {"fwd": (ll.fused_fwd, composed.lora_linear_fwd), "bwd": (ll.fused_bwd, composed.lora_linear_bwd)}[op]
    runners = {"fused": lambda: fns[0](*args), "composed": lambda: fns[1](*args)}
    return decide(torch.cuda.get_device_name(x.device), key(op, x, weight, lora_A, lora_B, dropout_p), runners)
