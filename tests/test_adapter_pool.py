"""AdapterPool: PEFT parity, LRU eviction and reload, content identity, pinning, refusals, threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import tiny_llama

from lora_triton import LoraConfig
from lora_triton.serving import AdapterPool

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=ALL, use_rslora=True),
    "c": dict(r=16, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 4}),
    "d": dict(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"]),
    "big": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),
    "a_v2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def _save(base, name, spec, root, seed):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**spec))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = root / name
    pm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_llama(seed=0)
    root = tmp_path_factory.mktemp("pool")
    dirs = {n: _save(base, n, spec, root, seed) for seed, (n, spec) in enumerate(SPECS.items())}
    expected_model = None
    for n in "abcd":
        if expected_model is None:
            expected_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[n], adapter_name=n)
        else:
            expected_model.load_adapter(dirs[n], adapter_name=n)
    expected_model.eval()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    return base, dirs, expected_model, ids


def peft_logits(pm, ids, names):
    with torch.no_grad():
        return pm(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits


def pool_logits(pool, ids, names):
    with torch.no_grad(), pool.batch(names):
        return pool.model(input_ids=ids).logits


def make_pool(setup, num_slots=2, max_rank=16, targets=ALL):
    base, dirs, _, _ = setup
    return AdapterPool(copy.deepcopy(base), num_slots=num_slots, max_rank=max_rank, target_modules=targets), dirs


def test_matches_peft_and_eviction_reload_is_identical(setup):
    pool, dirs = make_pool(setup)
    _, _, pm, ids = setup
    for n in "abcd":
        pool.load(n, dirs[n])
    info = pool.adapters()
    assert sum(v["resident"] for v in info.values()) == 2 and not info["a"]["resident"]  # LRU: a, b evicted
    first = {}
    for names in (["a", None, "b"], ["c", "d", None], ["a", "c", "a"], ["d", "b", "b"], ["a", None, "b"]):
        got = pool_logits(pool, ids, names)
        torch.testing.assert_close(got, peft_logits(pm, ids, names), atol=1e-5, rtol=1e-5)
        key = tuple(names)
        if key in first:
            assert torch.equal(got, first[key]), "a reloaded adapter must give identical outputs"
        first[key] = got
    assert pool.adapters()["a"]["resident"] and pool.adapters()["b"]["resident"]
    # lora_B stacks are rank-major on CPU (serving._hook.zeros_lora_B), [slots, out, r] as views
    assert all(b.shape[2] == 16 and b.transpose(1, 2).is_contiguous() for _, b, _, _ in pool._buffers.values())


def test_triton_interpreter_pool_matches_reference(setup, monkeypatch):
    pool, dirs = make_pool(setup)
    _, _, _, ids = setup
    pool.load("b", dirs["b"])
    pool.load("c", dirs["c"])
    names = ["c", None, "b"]
    exp = pool_logits(pool, ids[:, :4], names)
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    torch.testing.assert_close(pool_logits(pool, ids[:, :4], names), exp, atol=1e-5, rtol=1e-5)


def test_content_identity(setup):
    pool, dirs = make_pool(setup)
    _, _, pm, ids = setup
    h1 = pool.load("x", dirs["a"])
    assert pool.load("x", dirs["a"]) == h1  # same content: a no-op
    out_a = pool_logits(pool, ids, ["x"] * 3)
    h2 = pool.load("x", dirs["a_v2"])  # same name, new weights: a new adapter
    assert h2 != h1 and pool.digest("x") == h2
    out_v2 = pool_logits(pool, ids, ["x"] * 3)
    assert (out_a - out_v2).abs().max() > 1e-3
    torch.testing.assert_close(out_a, peft_logits(pm, ids, ["a"] * 3), atol=1e-5, rtol=1e-5)


def test_state_dict_source_and_pinning(setup):
    pool, dirs = make_pool(setup)
    _, _, pm, ids = setup
    from lora_triton import read_peft_adapter
    cfg, tensors = read_peft_adapter(dirs["b"])
    pool.load("b", tensors, config=cfg, pin=True)
    for n in "acd":
        pool.load(n, dirs[n])
        assert pool.adapters()["b"]["resident"]
    with pytest.raises(RuntimeError, match="pinned or in use"):
        pool.pin("a")
        pool.pin("c")  # two pinned slots besides b's: no room
    pool.unpin("b")
    pool.unpin("a")
    names = ["b", "c", None]
    torch.testing.assert_close(pool_logits(pool, ids, names), peft_logits(pm, ids, names), atol=1e-5, rtol=1e-5)
    pool.unload("c")
    with pytest.raises(KeyError, match=r"unknown adapter.*loaded: \['a', 'b', 'd'\]"):
        pool_logits(pool, ids, names)


def test_refusals(setup, tmp_path):
    pool, dirs = make_pool(setup, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    with pytest.raises(ValueError, match="rank 32 .* exceeds the pool's max_rank=16"):
        pool.load("big", dirs["big"])
    with pytest.raises(ValueError, match=r"the pool does not target module 'model\.layers\.0\."):
        pool.load("b", dirs["b"])
    a = torch.zeros(2, 64)
    bb = torch.zeros(64, 2)
    bad = {"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": a,
           "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": bb}
    with pytest.raises(ValueError, match="the base model has no module"):
        pool.load("n", bad, config=LoraConfig(r=2, target_modules=["nope"]))
    with pytest.raises(ValueError, match="needs its LoraConfig"):
        pool.load("n", bad)
    pool.load("a", dirs["a"])
    pool.load("d", dirs["d"])
    pool.load("c", dirs["c"])
    with pytest.raises(ValueError, match="3 distinct adapters but the pool has 2 slots"):
        with pool.batch(["a", "c", "d"]):
            pass
    with pytest.raises(KeyError, match="zzz"):
        with pool.batch(["zzz"]):
            pass
    assert set(pool.adapters()) == {"a", "c", "d"}
    with pytest.raises(ValueError, match="num_slots"):
        AdapterPool(pool.model, num_slots=0, max_rank=8)


def test_loads_during_forwards_never_corrupt_them(setup):
    pool, dirs = make_pool(setup, num_slots=2)
    _, _, _, ids = setup
    for n in "ab":
        pool.load(n, dirs[n])
    names = ["a", None, "b"]
    expected = pool_logits(pool, ids, names)
    errors, results = [], []

    def churn():  # loads evict a / b, reloads under one name change content, unloads free slots
        try:
            for i in range(6):
                pool.load("c", dirs["c"])
                pool.load("d", dirs["d"])
                pool.load("x", dirs["a_v2"] if i % 2 else dirs["c"])
                pool.unload("c")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def forwards():
        try:
            for _ in range(8):
                results.append(pool_logits(pool, ids, names))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=churn), threading.Thread(target=forwards), threading.Thread(target=forwards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(results) == 16
    for got in results:
        assert torch.equal(got, expected)
