"""QLoRA layer benchmark: our 4-bit LoraLinear vs PEFT over bitsandbytes' Linear4bit vs the frozen layer.

    python -m lora_triton.benchmark.qlora [--shapes 1024x1024,2048x2048] [--tokens 2048] [--rank 16]
                                          [--repeats 5] [--json out.json]

One process, providers interleaved per round (``timing.measure_interleaved``). Per provider and shape:
training step (forward + backward, x requires grad) and inference (no grad) seconds (median), the step's
process CPU time (median, all threads), bytes saved for backward beyond x and the parameters, peak bytes
allocated during one training step above what was allocated before it (CPU: bytes held by the tensors
aten ops create during the step, those inside custom ops included, tracked by a dispatch mode, outputs
and x.grad included, x / dy / parameters excluded; CUDA: the allocator's peak), and the weight bytes per
parameter.
PEFT + bnb runs in training mode for the step (bitsandbytes 0.50 repacks the weight for its bf16 CPU
kernel at the first eval-mode no-grad forward and training fails afterwards) and on its own copy in
eval mode for inference.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import weakref

import torch
from torch import nn
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

from ..reference.nf4 import _SCRATCH
from .timing import cuda_peak_bytes, measure_interleaved, saved_tensor_bytes


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages held by tensors that aten ops create while active (views share their
    storage; a storage is released when the last tensor seen on it dies): peak and current.

    Storages alive before the step (``exclude``: x, dy, parameters, buffers) are never counted. A custom
    op defined in Python (ours, bitsandbytes') is opaque to a dispatch mode: its body runs under a child
    mode sharing these counters, so its temporaries (dequantized chunks, index buffers) count too."""

    def __init__(self, exclude=(), parent: _LiveTensorBytes | None = None):
        super().__init__()
        self.root = parent.root if parent is not None else self
        if parent is None:
            self.live = self.peak = 0
            self.refs: dict[int, list] = {}  # storage ptr -> [tensors alive, bytes]
            self.skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}

    def _release(self, ptr: int) -> None:
        root = self.root
        entry = root.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            root.live -= entry[1]
            del root.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = custom_ops.OPDEFS.get(func._schema.name) if isinstance(func, torch._ops.OpOverload) else None
        if opdef is not None:
            with _LiveTensorBytes(parent=self):
                out = opdef._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        root = self.root
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0 or ptr in root.skip:
                    continue
                entry = root.refs.setdefault(ptr, [0, storage.nbytes()])
                if entry[0] == 0:
                    root.live += entry[1]
                    root.peak = max(root.peak, root.live)
                entry[0] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def cpu_peak_bytes(fn, i: int, exclude=()) -> int:
    """Peak bytes held by tensors created during one call (outputs, saved tensors, x.grad, temporaries,
    those inside custom ops included), storages in ``exclude`` left out."""
    gc.collect()
    mode = _LiveTensorBytes(exclude)
    with mode:
        fn(i)
    return mode.peak


def _ours(w, b, r, device):
    from ..nn.lora_linear import LoraLinear
    from ..nn.nf4_linear import NF4Linear

    layer = LoraLinear(NF4Linear.from_weight(w, b), r=r, lora_alpha=2 * r).to(device).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    return layer, layer.base_layer.weight_bytes()


def _peft_bnb(w, b, r, device):
    import bitsandbytes as bnb
    import peft

    q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=b is not None, quant_type="nf4", compress_statistics=True,
                          compute_dtype=w.dtype)
    q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                 module=q)
    if b is not None:
        q.bias = nn.Parameter(b.clone(), requires_grad=False)
    model = nn.Sequential()
    model.add_module("proj", q.to(device))
    model.is_loaded_in_4bit = True
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["proj"], r=r, lora_alpha=2 * r)).train()
    qs = q.weight.quant_state
    nbytes = q.weight.numel() * q.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    if qs.nested:
        nbytes += qs.state2.absmax.numel() * 4
    return model, nbytes


def _base(w, b, r, device):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    layer.requires_grad_(False)
    return layer, layer.weight.numel() * layer.weight.element_size()


BUILDERS = {"qlora_lora_triton": _ours, "peft_bnb": _peft_bnb, "frozen_fp32": _base}


def _available(name: str) -> bool:
    if name != "peft_bnb":
        return True
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "peft"))


def _cpu_timed(fn, log: list):
    """``fn`` also logging the process CPU time (all threads) of each call: on a shared machine, less
    sensitive than wall time to other jobs holding the cores (not to their cache and memory traffic)."""

    def timed(i):
        c0 = time.process_time()
        fn(i)
        log.append(time.process_time() - c0)

    return timed


def run_shape(n: int, k: int, tokens: int, r: int, repeats: int, warmup: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    w, b = (torch.randn(n, k, generator=g) / k**0.5).to(device), torch.randn(n, generator=g).to(device)
    xs = [torch.randn(tokens, k, generator=g).to(device).requires_grad_() for _ in range(2)]
    dy = torch.randn(tokens, n, generator=g).to(device)
    names = [name for name in BUILDERS if _available(name)]
    train_layers, infer_layers, wbytes, steps, infers = {}, {}, {}, {}, {}
    for name in names:
        train_layers[name], wbytes[name] = BUILDERS[name](w, b, r, device)
        infer_layers[name] = BUILDERS[name](w, b, r, device)[0].eval()

        def step(i, layer=train_layers[name]):
            x = xs[i]
            x.grad = None
            layer(x).backward(dy)

        def infer(i, layer=infer_layers[name]):
            with torch.no_grad():
                return layer(xs[i])

        steps[name], infers[name] = step, infer
    cpu_t: dict[str, list[float]] = {name: [] for name in names}
    train_t = measure_interleaved({name: _cpu_timed(steps[name], cpu_t[name]) for name in names}, device, repeats,
                                  warmup, n_sets=2)
    infer_t = measure_interleaved(infers, device, repeats, warmup, n_sets=2)
    out = {}
    for name in names:
        params = list(train_layers[name].parameters()) + list(train_layers[name].buffers())
        saved = saved_tensor_bytes(lambda i, f=train_layers[name]: f(xs[i]), 0, [xs[0], *params])
        if device.type == "cuda":
            peak = cuda_peak_bytes(steps[name], 0, device)
        else:
            _SCRATCH.buffers.clear()  # our reused chunk buffers are allocated (and counted) inside the step
            peak = cpu_peak_bytes(steps[name], 0, [xs[0], dy, *params])
        out[name] = dict(train_s=statistics.median(train_t[name]), infer_s=statistics.median(infer_t[name]),
                         train_cpu_s=statistics.median(cpu_t[name][warmup:]),
                         saved_bytes=saved, step_peak_bytes=peak, weight_bytes=wbytes[name],
                         weight_bytes_per_param=wbytes[name] / (n * k))
    base = out["frozen_fp32"]
    for rec in out.values():
        rec["train_vs_frozen"] = rec["train_s"] / base["train_s"]
        rec["infer_vs_frozen"] = rec["infer_s"] / base["infer_s"]
        rec["train_cpu_vs_frozen"] = rec["train_cpu_s"] / base["train_cpu_s"]
    return dict(shape=dict(out_features=n, in_features=k, tokens=tokens, r=r, dtype="float32"), results=out)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError as exc:
        raise SystemExit(f"--shapes must look like 1024x1024,2048x4096 (out x in), got {text!r}") from exc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_triton.benchmark.qlora", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1024x1024,2048x2048", help="out x in, comma-separated")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    doc = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
               load_before=list(os.getloadavg()), runs=[])
    for n, k in _shapes(args.shapes):
        run = run_shape(n, k, args.tokens, args.rank, args.repeats, args.warmup, device)
        doc["runs"].append(run)
        print(f"{n}x{k}, {args.tokens} tokens, r={args.rank}, fp32, {args.device}:")
        for name, rec in run["results"].items():
            print(f"  {name:<18} step {rec['train_s'] * 1e3:8.1f} ms ({rec['train_vs_frozen']:.2f}x frozen; "
                  f"CPU time {rec['train_cpu_s'] * 1e3:.1f} ms, {rec['train_cpu_vs_frozen']:.2f}x)  "
                  f"infer {rec['infer_s'] * 1e3:8.1f} ms ({rec['infer_vs_frozen']:.2f}x)  "
                  f"saved {rec['saved_bytes'] / 2**20:6.2f} MiB  step peak {rec['step_peak_bytes'] / 2**20:7.1f} MiB  "
                  f"weight {rec['weight_bytes_per_param']:.4f} B/param")
    doc["load_after"] = list(os.getloadavg())
    print(f"load average before/after: {doc['load_before']} / {doc['load_after']}  ({doc['date']})")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
