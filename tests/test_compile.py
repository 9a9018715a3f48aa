"""torch.compile(fullgraph=True) traces a model with LoRA layers (no graph breaks) and matches eager.

Two compiles in all: inference through inductor, training (dropout on) through aot_eager, whose
random draws equal eager's so the dropout masks match under the same torch.manual_seed.
"""

from __future__ import annotations

import signal

import pytest
import torch
from models import model_input, randomize_lora, tiny_mlp

import lora_triton

BUDGET_S = 300  # a hang guard, not a speed check: a cold inductor cache compiles C++


@pytest.fixture(autouse=True)
def _budget(monkeypatch):
    """Fail (instead of hanging) when a compile runs past the budget."""
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"torch.compile test exceeded its {BUDGET_S}s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(BUDGET_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _model():
    cfg = lora_triton.LoraConfig(target_modules=["up", "down", "inp"], r=4, lora_alpha=8, lora_dropout=0.2,
                                 lora_bias=True)
    model = lora_triton.inject_lora(tiny_mlp(), cfg)
    randomize_lora(model, seed=2)
    return model


def test_compile_inference_fullgraph():
    torch._dynamo.reset()
    model = _model().eval()
    x = model_input("mlp")["x"]
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x2 = model_input("mlp", seed=5)["x"]  # same shape: no recompile, still right
        torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_compile_training_with_dropout_fullgraph():
    torch._dynamo.reset()
    model = _model().train()
    x = model_input("mlp")["x"]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params

    def step(fn):
        torch.manual_seed(123)
        loss = (fn(x) ** 2).mean()
        return loss.detach(), torch.autograd.grad(loss, params)

    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads, eager_grads):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
    # Dropout is live inside the compiled graph: another manual seed, another loss.
    torch.manual_seed(124)
    assert not torch.allclose((compiled(x) ** 2).mean(), loss)
