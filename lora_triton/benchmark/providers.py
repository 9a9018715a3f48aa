"""What is measured for ``lora_linear`` cases: one builder per provider, all sharing the same
weights and inputs so only the implementation differs.

Providers: ``lora_triton`` (our op on the backend ``choose_backend`` picks), ``torch_unfused``
(PEFT's composition base(x) + lora_B(lora_A(dropout(x))) * s with nn.Dropout),
``peft`` (peft.tuners.lora.Linear wrapping nn.Linear), ``torch_compile`` (torch.compile of the
unfused composition; opt-in) and ``base`` (the frozen nn.Linear alone: the floor).
Training calls use ``torch.autograd.grad`` so no provider pays for ``.grad`` accumulation.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case

SINGLE_PROVIDERS = ("lora_triton", "torch_unfused", "peft", "torch_compile", "base")


@dataclass
class Provider:
    name: str
    fn: Callable[[int], Any]  # one call on input set i
    cost_kind: str  # "lora" or "base": which analytic model judges it
    exclude: list = field(default_factory=list)  # tensors alive anyway (not counted as saved)
    graphable: bool = True  # may be captured in a CUDA graph
    note: str = ""


class SkipProvider(Exception):
    """Raised by a builder when a provider cannot run here (package missing, op not written yet)."""


def build_wanted(names, builders: dict[str, Callable[[], Provider]], errors=(ImportError, AttributeError),
                 exclude: list | None = None) -> tuple[list[Provider], list[tuple[str, str]]]:
    """(providers, skipped [(name, reason)]) of ``builders[name]()`` for each name, the runner's contract
    shared by every op's ``build_*_providers``: a builder raising ``SkipProvider`` or one of ``errors``
    (an optional package missing or too old) becomes a skip, not a failed run. ``exclude`` (tensors
    alive anyway) is set on every provider built."""
    providers, skipped = [], []
    for name in names:
        try:
            providers.append(builders[name]())
        except SkipProvider as exc:
            skipped.append((name, str(exc)))
        except errors as exc:
            skipped.append((name, f"{type(exc).__name__}: {exc}"))
    if exclude is not None:
        for p in providers:
            p.exclude = exclude
    return providers, skipped


@dataclass
class LoraOperands:
    xs: list  # input sets
    dys: list
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    p: float
    training: bool


def make_operands(case: Case, device: torch.device, n_sets: int) -> LoraOperands:
    dtype = getattr(torch, case.dtype)
    training = case.mode == "fwd+bwd"
    g = torch.Generator(device="cpu").manual_seed(0)
    m, k, n, r = case.tokens, case.in_features, case.out_features, case.rank

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    xs = [rand(m, k).requires_grad_(training) for _ in range(n_sets)]
    dys = [rand(m, n) for _ in range(n_sets)] if training else []
    weight = rand(n, k, std=k**-0.5)
    lora_A = rand(r, k, std=k**-0.5).requires_grad_(training)
    lora_B = rand(n, r, std=0.02).requires_grad_(training)
    return LoraOperands(xs, dys, weight, lora_A, lora_B, case.scaling, case.dropout_p, training)


def _step(ops: LoraOperands, forward: Callable, params: list) -> Callable[[int], Any]:
    """Wrap a forward into one inference call or one training step (forward + backward)."""
    if not ops.training:
        def infer(i):
            with torch.no_grad():
                return forward(ops.xs[i])
        return infer

    def train(i):
        x = ops.xs[i]
        y = forward(x)
        return torch.autograd.grad(y, [x, *params], ops.dys[i])
    return train


def _build_lora_triton(ops: LoraOperands, case: Case) -> Provider:
    from lora_triton.ops.backend import choose_backend
    from lora_triton.ops.lora_linear import lora_linear

    p = ops.p if ops.training else 0.0  # inference: dropout is off, as in eval mode
    fwd = lambda x: lora_linear(x, ops.weight, None, ops.lora_A, ops.lora_B, ops.scaling, p)
    backend = choose_backend(ops.weight.device)
    return Provider("lora_triton", _step(ops, fwd, [ops.lora_A, ops.lora_B]), "lora",
                    graphable=not ops.training, note=f"backend={backend}")


def _unfused_forward(ops: LoraOperands) -> Callable:
    dropout = nn.Dropout(ops.p).train(ops.training)

    def fwd(x):
        return F.linear(x, ops.weight) + F.linear(F.linear(dropout(x), ops.lora_A), ops.lora_B) * ops.scaling
    return fwd


def _build_unfused(ops: LoraOperands, case: Case) -> Provider:
    return Provider("torch_unfused", _step(ops, _unfused_forward(ops), [ops.lora_A, ops.lora_B]), "lora",
                    graphable=not ops.training)


def _build_compile(ops: LoraOperands, case: Case) -> Provider:
    compiled = torch.compile(_unfused_forward(ops), dynamic=False)
    return Provider("torch_compile", _step(ops, compiled, [ops.lora_A, ops.lora_B]), "lora",
                    graphable=False, note="torch.compile(unfused), compile time excluded (warm-up)")


def peft_version() -> str | None:
    if importlib.util.find_spec("peft") is None:
        return None
    from importlib.metadata import version
    return version("peft")


def _build_peft(ops: LoraOperands, case: Case) -> Provider:
    if peft_version() is None:
        raise SkipProvider("peft is not installed")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    n, k = ops.weight.shape
    r = ops.lora_A.shape[0]
    base = nn.Linear(k, n, bias=False, device="meta")
    base.weight = nn.Parameter(ops.weight, requires_grad=False)
    alpha = ops.scaling * r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=ops.p)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=ops.p)
    # Share our adapter tensors (same dtype as the base: an apples-to-apples bf16 comparison).
    layer.lora_A["default"].weight = nn.Parameter(ops.lora_A, requires_grad=ops.training)
    layer.lora_B["default"].weight = nn.Parameter(ops.lora_B, requires_grad=ops.training)
    layer.train(ops.training)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return Provider("peft", _step(ops, layer, params), "lora", graphable=not ops.training,
                    note=f"peft {peft_version()}")


def _build_base(ops: LoraOperands, case: Case) -> Provider:
    return Provider("base", _step(ops, lambda x: F.linear(x, ops.weight), []), "base",
                    graphable=not ops.training)


_BUILDERS = {"lora_triton": _build_lora_triton, "torch_unfused": _build_unfused, "peft": _build_peft,
             "torch_compile": _build_compile, "base": _build_base}


def build_single_providers(case: Case, device: torch.device, wanted: list[str], n_sets: int):
    """(providers, skipped [(name, reason)], exclude-list) for a ``lora_linear`` case."""
    ops = make_operands(case, device, n_sets)
    builders = {name: functools.partial(build, ops, case) for name, build in _BUILDERS.items()}
    return build_wanted(wanted, builders, exclude=[*ops.xs, *ops.dys, ops.weight, ops.lora_A, ops.lora_B])
