"""Masks drawn ahead for a training step (reference/mask_forecast.py + mask_memo.seeds_drawn): the same
bits, losses and gradients as without forecasting, one batched generator call per step once the pattern
is known, wrong forecasts cost nothing but the batch, and repeated misses switch it off."""

from __future__ import annotations

import pytest
import torch
from models import model_input, randomize_lora, run, tiny_llama

import lora_triton as lt
from lora_triton.ops import seeds
from lora_triton.reference import mask_forecast, mask_memo, philox

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    mask_memo.clear()
    yield
    mask_memo.clear()


def _model(p=0.2):
    model = tiny_llama()
    lt.inject_lora(model, lt.LoraConfig(r=4, lora_dropout=p, target_modules=TARGETS))
    randomize_lora(model)
    return model.train()


def _steps(model, n, between=None, seed=5):
    """Losses and gradients of n training steps from one torch.manual_seed; ``between(i)`` runs after step i."""
    inputs = model_input("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    torch.manual_seed(seed)
    for i in range(n):
        loss = run(model, inputs).float().square().mean()
        out.append([loss.detach(), *torch.autograd.grad(loss, params)])
        if between is not None:
            between(i)
    return out


def _same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(step_a, step_b))


def _generator_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = philox._Philox.run

    def counting(self, counters, keys, flip16=False, below_2_32=False):
        calls.append(counters.numel())
        return real(self, counters, keys, flip16, below_2_32)

    monkeypatch.setattr(philox._Philox, "run", counting)
    return calls


def test_forecast_gives_the_same_steps_and_one_generator_call_per_step(monkeypatch):
    model = _model()
    calls = _generator_calls(monkeypatch)
    per_step = []
    got = _steps(model, 3, between=lambda i: (per_step.append(len(calls)), calls.clear()))
    # Step 1 records the pattern (a call per projection group); then one batch per mask shape: x [14, 64]
    # for q/k/v, o, gate/up and [14, 128] for down_proj.
    assert per_step[0] > 2 and per_step[1:] == [2, 2]
    fc = mask_forecast.state()
    assert fc.used == len(fc.forecast) > 0 and mask_memo.held_bytes() == 0
    monkeypatch.setattr(mask_forecast, "MAX_STRIKES", 0)  # forecasting off
    mask_memo.clear()
    _same(got, _steps(model, 3))
    monkeypatch.setattr(mask_memo, "MAX_BYTES", 0)  # no memo at all: every mask regenerated
    _same(got, _steps(model, 3))


def test_wrong_forecasts_change_nothing_and_switch_forecasting_off(monkeypatch):
    model = _model()
    # Another consumer of torch's generator inside the step, after its first seed draw: every seed drawn
    # after it differs from the peeked one, so most forecast masks go unused.
    def consume(module, args):
        torch.rand(3)

    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(consume)
    monkeypatch.setattr(mask_forecast, "MAX_STRIKES", 0)
    expected = _steps(model, 5)
    monkeypatch.setattr(mask_forecast, "MAX_STRIKES", 2)
    mask_memo.clear()
    _same(expected, _steps(model, 5))
    assert not mask_forecast.state().enabled()  # two forecasts mostly unused: this thread stopped forecasting


def test_generator_use_between_steps_is_forecast_right(monkeypatch):
    model = _model()
    calls = _generator_calls(monkeypatch)
    per_step = []
    got = _steps(model, 3, between=lambda i: (torch.rand(3), per_step.append(len(calls)), calls.clear()))
    assert per_step[1:] == [2, 2]  # the peek happens at the step's first draw, after the consumer
    monkeypatch.setattr(mask_forecast, "MAX_STRIKES", 0)
    mask_memo.clear()
    _same(got, _steps(model, 3, between=lambda i: torch.rand(3)))


def test_peek_is_the_next_draw_and_consumes_nothing():
    torch.manual_seed(9)
    ahead = seeds.peek_seeds(5)
    drawn = seeds.draw_seeds(2, torch.device("cpu")).tolist() + seeds.draw_seeds(3, torch.device("cpu")).tolist()
    assert ahead == drawn


def test_forecast_follows_gradient_accumulation_and_shape_changes(monkeypatch):
    model = _model(0.3)
    inputs, other = model_input("llama"), model_input("llama", seq=5)
    params = [p for p in model.parameters() if p.requires_grad]

    def accumulate(batches):
        torch.manual_seed(1)
        results = []
        for _ in range(3):
            losses = [run(model, b).float().square().mean() for b in batches]  # two forwards, then backward
            results.append([sum(losses).detach(), *torch.autograd.grad(sum(losses), params)])
        return results

    got = accumulate([inputs, other]) + accumulate([other])  # the second pattern starts with a stale forecast
    monkeypatch.setattr(mask_forecast, "MAX_STRIKES", 0)
    mask_memo.clear()
    _same(got, accumulate([inputs, other]) + accumulate([other]))
