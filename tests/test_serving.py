"""adapter_batch against the real PEFT: mixed batches, greedy and beam generation, hooks, caching."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_llama

from lora_triton import load_adapter
from lora_triton.nn import LoraLinear
from lora_triton.serving import adapter_batch, mixed_batch_check

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {  # three ranks, rsLoRA, rank_pattern, and adapters that skip some layers
    "a1": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, lora_alpha=16, target_modules=ALL, use_rslora=True),
    "a3": dict(r=16, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], rank_pattern={"o_proj": 4}),
}
NAMES = ["a1", "__base__", "a2", "a3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tiny_llama(seed=0)
    ours = copy.deepcopy(base)
    pm = None
    for name, spec in SPECS.items():
        cfg = peft.LoraConfig(**spec)
        if pm is None:
            pm = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname:  # PEFT initialises B to zero: make every adapter matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.eval()
    root = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(str(root), selected_adapters=list(SPECS))
    for name in SPECS:
        load_adapter(ours, str(root / name), adapter_name=name)
    ours.eval()
    ids = torch.randint(0, 128, (4, 7), generator=gen)
    return pm, ours, ids


def test_logits_match_peft(models):
    pm, ours, ids = models
    with torch.no_grad():
        exp = pm(input_ids=ids, adapter_names=NAMES).logits
        with adapter_batch(ours, NAMES):
            got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    # and each adapter really changes the output
    assert (exp[0] - exp[1]).abs().max() > 1e-2


def test_logits_match_peft_triton_interpreter(models, monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    pm, ours, ids = models
    names = ["a3", "a2", None, "a1"]
    with torch.no_grad():
        exp = pm(input_ids=ids[:, :5], adapter_names=[n or "__base__" for n in names]).logits
        with adapter_batch(ours, names):
            got = ours(input_ids=ids[:, :5]).logits
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_peft(models):
    pm, ours, ids = models
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        exp = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kw)
        with adapter_batch(ours, NAMES):
            got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, exp)


def test_beam_search_and_return_sequences_match_peft(models):
    pm, ours, ids = models
    names = NAMES[:2]
    ids, mask = ids[:2, :5], torch.ones_like(ids[:2, :5])
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        exp = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        with adapter_batch(ours, names):
            got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, exp)


def test_unknown_name_lists_loaded(models):
    _, ours, _ = models
    with pytest.raises(KeyError, match=r"nope.*loaded: \['a1', 'a2', 'a3'\]"):
        with adapter_batch(ours, ["a1", "nope"]):
            pass


def test_hooks_restored_on_exit_and_exception(models):
    _, ours, ids = models
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    assert all(m.mixed_batch is None for m in layers)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter_batch(ours, NAMES):
            assert all(m.mixed_batch is not None for m in layers)
            raise RuntimeError("boom")
    assert all(m.mixed_batch is None for m in layers)
    with pytest.raises(ValueError, match="4 sequences but 3 adapter names"):
        with torch.no_grad(), adapter_batch(ours, NAMES[:3]):
            ours(input_ids=ids)
    assert all(m.mixed_batch is None for m in layers)


def test_stack_cache_sees_adapter_changes(models):
    _, ours, ids = models
    layer = next(m for m in ours.modules() if isinstance(m, LoraLinear) and "a1" in m.lora_B)
    with torch.no_grad():
        with adapter_batch(ours, NAMES):
            before = ours(input_ids=ids).logits
        saved = layer.lora_B["a1"].weight.clone()
        layer.lora_B["a1"].weight.mul_(3.0)  # in place: bumps the version counter
        try:
            with adapter_batch(ours, NAMES):
                after = ours(input_ids=ids).logits
            report = mixed_batch_check(ours, NAMES, {"input_ids": ids})
        finally:
            layer.lora_B["a1"].weight.copy_(saved)
    assert (after[0] - before[0]).abs().max() > 1e-4  # row 0 uses a1
    torch.testing.assert_close(after[1:], before[1:])
    assert report["ok"], report


def test_mixed_batch_check_restores_active_adapters(models):
    _, ours, ids = models
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    before = [list(m.active_adapters) for m in layers]
    report = mixed_batch_check(ours, ["a2", None, "a3", "a1"], {"input_ids": ids})
    assert report["ok"] and report["max_abs_diff"] < 1e-5
    assert [list(m.active_adapters) for m in layers] == before


def test_modules_to_save_heads_per_row_match_peft(tmp_path):
    """Each row uses its adapter's own modules_to_save copy (here lm_head); base rows the original."""
    base = tiny_llama(seed=3)
    ours = copy.deepcopy(base)
    specs = {"h1": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
             "h2": dict(r=2, lora_alpha=2, target_modules=["v_proj"], modules_to_save=["lm_head"])}
    pm = None
    for name, spec in specs.items():
        cfg = peft.LoraConfig(init_lora_weights=False, **spec)
        pm = peft.get_peft_model(base, cfg, adapter_name=name) if pm is None else pm
        if name != "h1":
            pm.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "modules_to_save" in pname:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    pm.eval()
    pm.save_pretrained(str(tmp_path), selected_adapters=list(specs))
    for name in specs:
        load_adapter(ours, str(tmp_path / name), adapter_name=name)
    ours.eval()
    names = ["h2", "__base__", "h1", "h2"]
    ids = torch.randint(0, 128, (4, 6), generator=gen)
    with torch.no_grad():
        ref = pm(ids, adapter_names=names).logits
        with adapter_batch(ours, names):
            got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-5
    assert mixed_batch_check(ours, names, {"input_ids": ids})["ok"]
