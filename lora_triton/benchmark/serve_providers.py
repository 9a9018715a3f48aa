"""What is measured for ``multi_lora_linear`` (serving) cases: a mixed batch where sequence i
uses adapter i % adapters, inference only.

Providers: ``lora_triton`` (our multi_lora_linear; skipped cleanly if the op is missing),
``lora_triton_delta`` (the same op without the base GEMM, weight=None: the LoRA traffic alone,
judged against its own byte count; only on cases flagged ``lora_only``), ``torch_unfused``
(a plain PyTorch gather + bmm per token, padded to the max rank), ``peft`` (peft.tuners.lora.Linear
holding every adapter, ``forward(x, adapter_names=[...])``: PEFT's mixed-batch loop) and ``base``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case
from .providers import Provider, SkipProvider, build_wanted, peft_version

SERVE_PROVIDERS = ("lora_triton", "lora_triton_delta", "torch_unfused", "peft", "base")


@dataclass
class ServeOperands:
    xs: list  # [batch, seq_len, K] input sets
    weight: torch.Tensor
    lora_A: torch.Tensor  # [L, r_max, K], zero beyond each adapter's rank
    lora_B: torch.Tensor  # [L, N, r_max], in the serving layer's memory layout
    scalings: torch.Tensor  # [L] fp32
    ranks: torch.Tensor  # [L] int32
    seq_ids: torch.Tensor  # [batch]
    token_ids: torch.Tensor  # [batch * seq_len]


def make_serve_operands(case: Case, device: torch.device, n_sets: int) -> ServeOperands:
    dtype = getattr(torch, case.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    k, n, r_max, num = case.in_features, case.out_features, case.rank, case.adapters

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    ranks = torch.tensor(case.adapter_ranks, dtype=torch.int32)
    keep = torch.arange(r_max)[None, :] < ranks[:, None]  # [L, r_max]
    lora_A = rand(num, r_max, k, std=k**-0.5) * keep[:, :, None].to(device, dtype)
    from lora_triton.serving._hook import zeros_lora_B

    # Stored as the serving pool and adapter_batch store it (rank-major on CPU); same values either way.
    lora_B = zeros_lora_B(num, n, r_max, dtype, device).copy_(rand(num, n, r_max, std=0.02) * keep[:, None, :].to(
        device, dtype))
    scalings = torch.tensor([2.0 * 16 / r for r in case.adapter_ranks], dtype=torch.float32, device=device)
    seq_ids = torch.arange(case.batch, device=device) % num
    return ServeOperands(
        xs=[rand(case.batch, case.seq_len, k) for _ in range(n_sets)], weight=rand(n, k, std=k**-0.5),
        lora_A=lora_A, lora_B=lora_B, scalings=scalings, ranks=ranks.to(device), seq_ids=seq_ids,
        token_ids=seq_ids.repeat_interleave(case.seq_len))


def _no_grad(fn):
    def call(i):
        with torch.no_grad():
            return fn(i)
    return call


def _build_ours(ops: ServeOperands, case: Case, weight) -> Provider:
    try:
        mod = importlib.import_module("lora_triton.ops.multi_lora")
    except ImportError as exc:
        raise SkipProvider(f"lora_triton.ops.multi_lora is not available yet ({exc})") from exc
    from lora_triton.ops.backend import choose_backend

    ranks = ops.ranks if len(set(case.adapter_ranks)) > 1 else None

    def call(i):
        x = ops.xs[i]
        # validate=False: ids were checked once at setup, as a decode loop would (no host sync).
        return mod.multi_lora_linear(x.reshape(-1, x.shape[-1]), weight, None, ops.lora_A, ops.lora_B,
                                     ops.scalings, ops.token_ids, ranks, validate=False)

    mod.check_adapter_ids(ops.token_ids, case.adapters, ops.ranks, case.rank)
    name = "lora_triton" if weight is not None else "lora_triton_delta"
    return Provider(name, _no_grad(call), "lora" if weight is not None else "delta",
                    note=f"backend={choose_backend(ops.weight.device)}")


_GATHER_LIMIT_BYTES = 4 << 30


def _build_unfused(ops: ServeOperands, case: Case) -> Provider:
    gathered = ops.token_ids.numel() * (ops.lora_A[0].numel() + ops.lora_B[0].numel()) * ops.lora_A.element_size()
    if gathered > _GATHER_LIMIT_BYTES:  # per-token copies of A and B: prefill-sized batches would not fit
        raise SkipProvider(f"per-token gather would copy {gathered / 2**30:.1f} GiB (limit 4 GiB)")
    def call(i):
        x = ops.xs[i].reshape(-1, ops.weight.shape[1])
        ids = ops.token_ids
        u = torch.bmm(x.unsqueeze(1), ops.lora_A[ids].transpose(1, 2))  # [T, 1, r_max]
        u = u * ops.scalings[ids].to(x.dtype)[:, None, None]
        return F.linear(x, ops.weight) + torch.bmm(u, ops.lora_B[ids].transpose(1, 2)).squeeze(1)
    return Provider("torch_unfused", _no_grad(call), "lora", note="gather + bmm per token, max rank")


def _build_peft(ops: ServeOperands, case: Case) -> Provider:
    if peft_version() is None:
        raise SkipProvider("peft is not installed")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    n, k = ops.weight.shape
    base = nn.Linear(k, n, bias=False, device="meta")
    base.weight = nn.Parameter(ops.weight, requires_grad=False)
    layer = None
    for a, r in enumerate(case.adapter_ranks):
        alpha = float(ops.scalings[a]) * r
        cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False)
        if layer is None:
            layer = PeftLinear(base, "a0", config=cfg, r=r, lora_alpha=alpha, init_lora_weights=False)
        else:
            layer.update_layer(f"a{a}", r=r, lora_alpha=alpha, config=cfg, lora_dropout=0.0, init_lora_weights=False)
        with torch.no_grad():
            layer.lora_A[f"a{a}"].weight.copy_(ops.lora_A[a, :r])
            layer.lora_B[f"a{a}"].weight.copy_(ops.lora_B[a, :, :r])
    layer.to(ops.weight.dtype).eval().requires_grad_(False)
    names = [f"a{int(a)}" for a in ops.seq_ids.tolist()]
    return Provider("peft", _no_grad(lambda i: layer(ops.xs[i], adapter_names=names)), "lora", graphable=False,
                    note=f"peft {peft_version()} mixed batch (adapter_names)")


def _build_base(ops: ServeOperands, case: Case) -> Provider:
    return Provider("base", _no_grad(lambda i: F.linear(ops.xs[i], ops.weight)), "base")


def build_serve_providers(case: Case, device: torch.device, wanted: list[str], n_sets: int):
    """(providers, skipped [(name, reason)]) for a ``multi_lora_linear`` case."""
    ops = make_serve_operands(case, device, n_sets)
    builders = {"lora_triton": lambda: _build_ours(ops, case, ops.weight),
                "lora_triton_delta": lambda: _build_ours(ops, case, None),
                "torch_unfused": lambda: _build_unfused(ops, case),
                "peft": lambda: _build_peft(ops, case),
                "base": lambda: _build_base(ops, case)}
    names = [n for n in wanted if n in builders and (n != "lora_triton_delta" or case.lora_only)]
    return build_wanted(names, builders, errors=(ImportError, AttributeError, TypeError, ValueError))
