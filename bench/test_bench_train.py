"""CPU training layer (REFERENCE.md §4): fwd+bwd and inference of a 4096x4096 r=16 LoRA linear on
2048 tokens, fp32, against the frozen base layer and PEFT's layer. Providers come from the harness."""

import pytest
import torch

from lora_triton.benchmark.cases import Case
from lora_triton.benchmark.providers import build_single_providers

from .conftest import SMALL

TOKENS, FEATURES = (128, 256) if SMALL else (2048, 4096)
PROVIDERS = ("lora_triton", "torch_unfused", "peft", "base")


def _provider(mode: str, p: float, name: str):
    case = Case("bench", "lora_linear", mode, "llama-8b.q_proj", TOKENS, FEATURES, FEATURES, 16, "float32",
                dropout_p=p)
    providers, skipped = build_single_providers(case, torch.device("cpu"), [name], n_sets=1)
    if skipped:
        pytest.skip(f"{name}: {skipped[0][1]}")
    return providers[0]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_train_step(benchmark, provider, p):
    benchmark.group = f"train fwd+bwd {TOKENS}x{FEATURES}x{FEATURES} r16 p={p}"
    prov = _provider("fwd+bwd", p, provider)
    benchmark.pedantic(prov.fn, args=(0,), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_inference(benchmark, provider):
    benchmark.group = f"inference {TOKENS}x{FEATURES}x{FEATURES} r16"
    prov = _provider("fwd", 0.0, provider)
    benchmark.pedantic(prov.fn, args=(0,), rounds=5, iterations=1, warmup_rounds=1)
