"""Issue 8, serving: a batch open in one thread is invisible to forwards in other threads, and a
failed AdapterPool.load / pin changes nothing (a pinned adapter stays pinned when replaced)."""

from __future__ import annotations

import threading

import pytest
import torch
from models import model_input, randomize_lora, run, tiny_mlp

import lora_triton
from lora_triton.serving import AdapterPool, adapter_batch

TARGETS = ["up", "down"]


def _adapter_tensors(seed: int, r: int = 2):
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=TARGETS, r=r))
    randomize_lora(model, seed=seed)
    return lora_triton.adapter_state_dict(model), lora_triton.nn.adapter_configs(model)["default"]


def _pool(num_slots=2):
    pool = AdapterPool(tiny_mlp(), num_slots=num_slots, max_rank=4, target_modules=TARGETS)
    for i, name in enumerate("ab"):
        tensors, cfg = _adapter_tensors(seed=i + 1)
        pool.load(name, tensors, config=cfg, pin=True)
    return pool


def _state(pool):
    return pool.adapters(), {p: tuple(t.clone() for t in bufs) for p, bufs in pool._buffers.items()}


def _assert_same_state(before, after):
    assert before[0] == after[0]
    for path, bufs in before[1].items():
        assert all(torch.equal(x, y) for x, y in zip(bufs, after[1][path])), path


@pytest.mark.parametrize("pin", [False, True])
def test_failed_load_registers_nothing(pin):
    pool = _pool()
    before = _state(pool)
    tensors, cfg = _adapter_tensors(seed=9)
    with pytest.raises(RuntimeError, match="no slot for adapter 'c'"):
        pool.load("c", tensors, config=cfg, pin=pin)
    _assert_same_state(before, _state(pool))
    with pytest.raises(KeyError, match="unknown adapter 'c'"):
        pool.digest("c")


def test_failed_pin_leaves_the_adapter_unpinned():
    pool = _pool()
    pool.unpin("b")
    with torch.no_grad(), pool.batch(["a", "b"]):
        pass
    tensors, cfg = _adapter_tensors(seed=9)
    pool.load("c", tensors, config=cfg)  # evicts b (the only unpinned one)
    assert not pool.adapters()["b"]["resident"]
    pool.pin("c")
    with pytest.raises(RuntimeError, match="no slot for adapter 'b'"):
        pool.pin("b")
    assert pool.adapters()["b"]["pinned"] is False


def test_replacing_a_pinned_adapter_keeps_it_pinned():
    pool = _pool()
    tensors, cfg = _adapter_tensors(seed=7)
    digest = pool.load("a", tensors, config=cfg)
    info = pool.adapters()["a"]
    assert info["sha256"] == digest and info["pinned"] and info["resident"]


def _in_other_thread_while_open(open_batch, forward):
    """Open a batch in thread A, run ``forward`` in thread B while it is open; B's result."""
    opened, done, result = threading.Event(), threading.Event(), {}

    def holder():
        with open_batch():
            opened.set()
            done.wait(30)

    a = threading.Thread(target=holder)
    a.start()
    assert opened.wait(30)
    try:
        b = threading.Thread(target=lambda: result.setdefault("y", forward()))
        b.start()
        b.join(30)
    finally:
        done.set()
        a.join(30)
    return result["y"]


def test_pool_batch_is_invisible_to_other_threads():
    pool = _pool()
    inputs = model_input("mlp")
    with torch.no_grad():
        base = run(tiny_mlp(), inputs)
        with pool.batch(["a", "b"]):
            batched = run(pool.model, inputs)
        other = _in_other_thread_while_open(lambda: pool.batch(["a", "b"]), lambda: run(pool.model, inputs))
    assert not torch.equal(batched, base)
    assert torch.equal(other, base)  # the pool's model outside any batch: the base model


def test_adapter_batch_is_invisible_to_other_threads():
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=TARGETS, r=2), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=TARGETS, r=4), "b")
    randomize_lora(model)
    inputs = model_input("mlp")
    with torch.no_grad():
        plain = run(model, inputs)  # adapter "a" active
        other = _in_other_thread_while_open(lambda: adapter_batch(model, ["b", None]), lambda: run(model, inputs))
        with adapter_batch(model, ["b", None]):
            batched = run(model, inputs)
    assert not torch.equal(batched, plain)
    assert torch.equal(other, plain)


def test_adapter_stacks_made_under_inference_mode_serve_a_later_forward_with_grad():
    # The stacked adapters are cached per layer: built by a forward under torch.inference_mode, they must
    # still be savable for backward by a later mixed-batch forward whose input requires grad.
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=TARGETS, r=2), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=TARGETS, r=4), "b")
    randomize_lora(model)
    x = model_input("mlp")["x"]
    with adapter_batch(model, ["a", "b"]):
        with torch.inference_mode():
            want = model(x)
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        y.sum().backward()
    assert torch.equal(y.detach(), want)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
