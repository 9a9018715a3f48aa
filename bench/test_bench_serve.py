"""CPU mixed-adapter batch (REFERENCE.md §4): 16 adapters r=16, x [64, 1, 4096] and [256, 1, 4096],
sequence i on adapter i % 16; multi_lora_linear vs the base layer vs PEFT's mixed-batch forward."""

import pytest
import torch

from lora_triton.benchmark.cases import Case
from lora_triton.benchmark.serve_providers import build_serve_providers

from .conftest import SMALL

FEATURES = 256 if SMALL else 4096
PROVIDERS = ("lora_triton", "torch_unfused", "peft", "base")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [64, 256])
def test_mixed_batch(benchmark, provider, batch):
    benchmark.group = f"serve [{batch},1,{FEATURES}] 16 adapters r16"
    case = Case("bench", "multi_lora_linear", "fwd", "llama-8b.q_proj", batch, FEATURES, FEATURES, 16, "float32",
                adapters=16, batch=batch)
    providers, skipped = build_serve_providers(case, torch.device("cpu"), [provider], n_sets=1)
    if skipped:
        pytest.skip(f"{provider}: {skipped[0][1]}")
    benchmark.pedantic(providers[0].fn, args=(0,), rounds=10, iterations=1, warmup_rounds=2)
