"""Benchmark cases and the suites that list them, per device.

A case fixes the op, mode (forward = inference under no_grad, fwd+bwd = a training step with
LoRA parameters and x requiring grad, base frozen), shape, dtype and dropout; the runner times
every provider on it. CPU and CUDA suites differ in sizes and dtype, never mixed in one run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .shapes import MIXED_RANKS, ModelShape, serve_grid_points

SUITES = ("quick", "train", "serve", "all", "grid")
OPS = ("lora_linear", "multi_lora_linear", "dora_linear")


@dataclass(frozen=True)
class Case:
    suite: str
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    label: str  # where the shape comes from, e.g. "llama-8b.q_proj"
    tokens: int
    in_features: int
    out_features: int
    rank: int  # serve: the largest rank (storage is padded to it)
    dtype: str
    dropout_p: float = 0.0
    scaling: float = 2.0
    adapters: int = 1
    ranks: tuple[int, ...] = ()  # serve: one rank per adapter (empty: all ``rank``)
    batch: int = 1  # serve: sequences (tokens = batch * seq_len); adapter of sequence i = i % adapters
    cuda_graph: bool = False  # replay CUDA graphs (small decode cases: launch latency dominates)
    lora_only: bool = False  # serve: also time the op without the base GEMM (weight=None)
    repeats: int | None = None  # None: the suite default
    warmup: int | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.series}/T{self.tokens}"

    @property
    def series(self) -> str:
        """The case name without the token count: one line per provider on the plot."""
        parts = [self.suite, self.label, self.mode, f"r{self.rank}"]
        if self.op == "multi_lora_linear":
            parts.append(f"L{self.adapters}" + ("-mixed" if len(set(self.adapter_ranks)) > 1 else ""))
        if self.dropout_p:
            parts.append(f"p{self.dropout_p:g}")
        return "/".join(parts)

    @property
    def adapter_ranks(self) -> tuple[int, ...]:
        return self.ranks if self.ranks else (self.rank,) * self.adapters

    @property
    def seq_len(self) -> int:
        return self.tokens // self.batch

    def shape_dict(self) -> dict:
        d = {"tokens": self.tokens, "in_features": self.in_features, "out_features": self.out_features,
             "rank": self.rank, "adapters": self.adapters}
        if self.op == "multi_lora_linear":
            d.update(batch=self.batch, seq_len=self.seq_len, ranks=list(self.adapter_ranks))
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        d["tags"] = list(self.tags)
        return d


def _lora(suite, model: ModelShape, proj, tokens, rank, dtype, mode, p=0.0, **kw) -> Case:
    k, n = model.projection(proj)
    return Case(suite, "lora_linear", mode, f"{model.name}.{proj}", min(tokens, model.max_tokens), k, n, rank,
                dtype, dropout_p=p, **kw)


def _serve(suite, model: ModelShape, batch, seq_len, adapters, rank, dtype, ranks=(), **kw) -> Case:
    cap = model.max_tokens
    batch = min(batch, cap)
    seq_len = max(1, min(seq_len, cap // batch))
    adapters = min(adapters, batch)
    ranks = tuple(ranks[:adapters]) if ranks else ()
    h = model.hidden
    return Case(suite, "multi_lora_linear", "fwd", f"{model.name}.q_proj", batch * seq_len, h, h,
                max(ranks) if ranks else rank, dtype, adapters=adapters, ranks=ranks, batch=batch, **kw)


def quick_cases(model: ModelShape, cuda: bool) -> list[Case]:
    """Every series sweeps tokens, so each panel of the plot is a curve, not a point."""
    dtype = "bfloat16" if cuda else "float32"
    sweep = (256, 1024, 4096) if cuda else (64, 256)
    cases = [_lora("quick", model, "q_proj", t, 16, dtype, "fwd") for t in sweep]
    cases += [_lora("quick", model, "q_proj", t, 16, dtype, "fwd+bwd", p) for p in (0.0, 0.1) for t in sweep]
    # Short calls: more repeats, so a scheduler hiccup on a shared CPU moves the median less.
    decode = (64, 256)
    cases += [_serve("quick", model, b, 1, 16, 16, dtype, cuda_graph=cuda, repeats=None if cuda else 15)
              for b in decode]
    return _dedupe(cases)


# CPU training widths (square K = N): the dropout mask's cost relative to the GEMMs shrinks with width,
# so one width hides it; 4096 is the model's q_proj, the MLP's up_proj (4096 -> 14336) comes on top.
CPU_TRAIN_WIDTHS = (1024, 2048, 4096)


def _square(suite, model: ModelShape, width, tokens, rank, dtype, mode, p=0.0, **kw) -> Case:
    """A square width x width layer, labelled by width (the model's own q_proj when the widths agree)."""
    if width == model.hidden:
        return _lora(suite, model, "q_proj", tokens, rank, dtype, mode, p, **kw)
    return Case(suite, "lora_linear", mode, f"{model.name}.sq{width}", min(tokens, model.max_tokens), width,
                width, rank, dtype, dropout_p=p, **kw)


def train_cases(model: ModelShape, cuda: bool) -> list[Case]:
    if not cuda:  # REFERENCE.md §4 CPU case (4096x4096, r=16, 2048 tokens, fp32) at three widths + up_proj
        widths = sorted({min(w, model.hidden) for w in CPU_TRAIN_WIDTHS} | {model.hidden})
        cases = [_square("train", model, w, 2048, 16, "float32", "fwd+bwd", p, repeats=7)
                 for w in widths for p in (0.0, 0.1)]
        cases += [_lora("train", model, "up_proj", 2048, 16, "float32", "fwd+bwd", p, repeats=5) for p in (0.0, 0.1)]
        cases.append(_lora("train", model, "q_proj", 2048, 16, "float32", "fwd", repeats=7))
        return _dedupe(cases)
    bf = "bfloat16"
    return _dedupe([
        _lora("train", model, "q_proj", 8192, 16, bf, "fwd+bwd", 0.1),
        _lora("train", model, "q_proj", 8192, 16, bf, "fwd+bwd", 0.0),
        _lora("train", model, "up_proj", 8192, 16, bf, "fwd+bwd", 0.1),
        _lora("train", model, "q_proj", 8192, 64, bf, "fwd+bwd", 0.1),
        *[_lora("train", model, "q_proj", t, 16, bf, "fwd") for t in (512, 2048, 8192)],
        _lora("train", model, "up_proj", 8192, 16, bf, "fwd"),
    ])


def serve_cases(model: ModelShape, cuda: bool) -> list[Case]:
    if not cuda:  # REFERENCE.md §4: 16 adapters r=16, x [64, 1, 4096] and [256, 1, 4096], fp32
        return _dedupe([_serve("serve", model, b, 1, 16, 16, "float32", repeats=30, warmup=3) for b in (64, 256)])
    bf = "bfloat16"
    mixed = tuple(MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(256))
    mean_rank = round(sum(mixed) / len(mixed))
    return _dedupe([
        _serve("serve", model, 256, 1, 256, 16, bf, cuda_graph=True, lora_only=True, tags=("decode-bw",)),
        *[_serve("serve", model, t, 1, t, 16, bf, cuda_graph=True, lora_only=True, tags=("small-decode",))
          for t in (1, 4, 16)],
        _serve("serve", model, 256, 1, 256, 64, bf, ranks=mixed, cuda_graph=True, tags=("mixed",)),
        _serve("serve", model, 256, 1, 256, mean_rank, bf, cuda_graph=True, tags=("mean-rank",)),
        _serve("serve", model, 8, 1024, 1, 16, bf, tags=("prefill",)),
        _serve("serve", model, 64, 128, 64, 16, bf, tags=("prefill",)),
        _serve("serve", model, 64, 128, 64, 64, bf, tags=("prefill",)),
    ])


def grid_cases(model: ModelShape, cuda: bool) -> list[Case]:
    """The whole serving grid (long; not part of ``all``)."""
    dtype = "bfloat16" if cuda else "float32"
    out = []
    for tokens, adapters, rank in serve_grid_points():
        batch = tokens if tokens <= 256 else max(adapters, 8)
        graph = cuda and tokens <= 256
        out.append(_serve("grid", model, batch, tokens // batch, adapters, rank, dtype, cuda_graph=graph))
    return _dedupe(out)


def suite_cases(suite: str, models: list[ModelShape], cuda: bool) -> list[Case]:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    from .dora_cases import dora_train_cases  # its own file; it imports this one

    parts = {"quick": (quick_cases,), "train": (train_cases, dora_train_cases), "serve": (serve_cases,),
             "all": (train_cases, dora_train_cases, serve_cases), "grid": (grid_cases,)}[suite]
    return _dedupe([c for make in parts for m in models for c in make(m, cuda)])


def _dedupe(cases: list[Case]) -> list[Case]:
    """Tiny shapes cap tokens, which can collapse distinct cases into one name."""
    seen, out = set(), []
    for c in cases:
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


def select_cases(cases: list, only: str | None) -> list:
    """``--only`` for every benchmark command: comma-separated entries; an entry that is some case's exact name
    selects that case, any other entry every case whose name contains it (so "loha-conv2d" does not also pull
    in "loha-conv2d-effective", while "4096" picks every 4096-wide case). An entry that selects nothing is an
    error naming the cases there are: a typo must not run an empty benchmark."""
    if not only:
        return list(cases)
    names = [c.name for c in cases]
    chosen: set[str] = set()
    for entry in (e.strip() for e in only.split(",")):
        if not entry:
            continue
        hits = [entry] if entry in names else [n for n in names if entry in n]
        if not hits:
            raise SystemExit(f"--only {entry!r} matches no case; the cases are: {', '.join(names)}")
        chosen.update(hits)
    if not chosen:  # only empty entries ("," or " "): as much a typo as a name that matches nothing
        raise SystemExit(f"--only {only!r} names no case; the cases are: {', '.join(names)}")
    return [c for c in cases if c.name in chosen]
