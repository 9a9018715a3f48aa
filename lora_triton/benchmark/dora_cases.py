"""DoRA benchmark cases (op ``dora_linear``) and their providers, side by side in one run.

Providers: ``dora`` (our op; the row norm recomputed every call from the cached ||W||^2, as a
training step whose A and B just changed pays it), ``peft_dora`` (peft.tuners.lora.Linear with
use_dora=True), ``lora_triton`` (our plain LoRA op on the same shape: DoRA's overhead) and
``base`` (the frozen linear). Every provider shares the same weights and inputs.
Goals (docs/benchmarks.md): CPU fwd+bwd >= 2x faster than PEFT's DoRA at p = 0 and 0.1, saved
for backward <= 1/2 of PEFT's at p = 0 and <= 1/4 at p = 0.1, <= 1.3x our LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from .cases import Case
from .providers import (
    LoraOperands,
    Provider,
    SkipProvider,
    _build_base,
    _build_lora_triton,
    _step,
    build_wanted,
    make_operands,
    peft_version,
)
from .roofline import OpCost, base_linear_cost, lora_linear_cost

OP = "dora_linear"
DORA_PROVIDERS = ("dora", "peft_dora", "lora_triton", "base")


# Labels start with "dora." so case names never collide with the LoRA cases of the same shape.
def _case(label, tokens, width, rank, dtype, mode, p, **kw) -> Case:
    return Case("train", OP, mode, label, tokens, width, width, rank, dtype, dropout_p=p, **kw)


def dora_train_cases(model, cuda: bool) -> list[Case]:
    """CPU: 1024 and ``model``'s q_proj width (4096 for Llama-8B), 2048 tokens, r = 16, fp32,
    p = 0 and 0.1. CUDA: the issue's GPU goal, M = 8192, K = N = 4096, r = 16, bf16."""
    if cuda:
        k, n = model.projection("q_proj")
        return [Case("train", OP, "fwd+bwd", f"dora.{model.name}.q_proj", min(8192, model.max_tokens), k, n, 16,
                     "bfloat16", dropout_p=p) for p in (0.0, 0.1)]
    k, _ = model.projection("q_proj")
    tokens = min(2048, model.max_tokens)
    out = [_case("dora.square-1024", tokens, 1024, 16, "float32", "fwd+bwd", p, repeats=5) for p in (0.0, 0.1)]
    out += [Case("train", OP, "fwd+bwd", f"dora.{model.name}.q_proj", tokens, k, k, 16, "float32", dropout_p=p,
                 repeats=3) for p in (0.0, 0.1)]
    return out


def dora_case_costs(case: Case, elem: int) -> dict[str, OpCost]:
    """'dora' adds to LoRA's cost the norm (W A^T: 2 N K r, one read of W), y_pre written and read
    back ([M, N] twice) and, with dropout, PEFT's second base GEMM in forward and backward."""
    m, k, n, r = case.tokens, case.in_features, case.out_features, case.rank
    lora = lora_linear_cost(m, k, n, r, elem, case.mode)
    extra = OpCost(2.0 * n * k * r, elem * (n * k + 2 * m * n))
    if case.dropout_p:
        extra = extra + base_linear_cost(m, k, n, elem, case.mode)
    return {"dora": lora + extra, "lora": lora, "base": base_linear_cost(m, k, n, elem, case.mode)}


def _magnitude(ops: LoraOperands) -> torch.Tensor:
    """A trained-looking magnitude: the row norms of W + s B A, perturbed by up to 10%."""
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        norm = (ops.weight.float() + ops.scaling * ops.lora_B.float() @ ops.lora_A.float()).norm(dim=1)
        noise = 1 + 0.1 * (torch.rand(norm.shape, generator=g) - 0.5).to(norm.device)
    return (norm * noise).to(ops.weight.dtype).requires_grad_(ops.training)


def _build_dora(ops: LoraOperands, case: Case, magnitude: torch.Tensor) -> Provider:
    from lora_triton.ops.backend import choose_backend
    from lora_triton.ops.dora import dora_linear, dora_weight_norm, dora_weight_sq

    p = ops.p if ops.training else 0.0
    weight_sq = dora_weight_sq(ops.weight)  # once per frozen weight, as the layer caches it

    def fwd(x):
        norm = dora_weight_norm(ops.weight, ops.lora_A, ops.lora_B, ops.scaling, weight_sq)
        return dora_linear(x, ops.weight, None, ops.lora_A, ops.lora_B, magnitude, ops.scaling, p,
                           weight_norm=norm)
    return Provider("dora", _step(ops, fwd, [ops.lora_A, ops.lora_B, magnitude]), "dora",
                    graphable=not ops.training, note=f"backend={choose_backend(ops.weight.device)}")


def _build_peft_dora(ops: LoraOperands, case: Case, magnitude: torch.Tensor) -> Provider:
    if peft_version() is None:
        raise SkipProvider("peft is not installed")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    n, k = ops.weight.shape
    r = ops.lora_A.shape[0]
    base = nn.Linear(k, n, bias=False, device=ops.weight.device, dtype=ops.weight.dtype)
    base.weight = nn.Parameter(ops.weight, requires_grad=False)
    alpha = ops.scaling * r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=ops.p, use_dora=True)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=ops.p, use_dora=True)
    layer.lora_A["default"].weight = nn.Parameter(ops.lora_A, requires_grad=ops.training)
    layer.lora_B["default"].weight = nn.Parameter(ops.lora_B, requires_grad=ops.training)
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(magnitude, requires_grad=ops.training)
    layer.train(ops.training)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    return Provider("peft_dora", _step(ops, layer, params), "dora", graphable=not ops.training,
                    note=f"peft {peft_version()}")


def build_dora_providers(case: Case, device: torch.device, wanted: list[str], n_sets: int):
    """(providers, skipped [(name, reason)]) for a ``dora_linear`` case (the runner's contract)."""
    ops = make_operands(case, device, n_sets)
    magnitude = _magnitude(ops)
    builders = {"dora": lambda: _build_dora(ops, case, magnitude),
                "peft_dora": lambda: _build_peft_dora(ops, case, magnitude),
                "lora_triton": lambda: _build_lora_triton(ops, case), "base": lambda: _build_base(ops, case)}
    return build_wanted([n for n in wanted if n in builders], builders,
                        exclude=[*ops.xs, *ops.dys, ops.weight, ops.lora_A, ops.lora_B, magnitude])
