"""LoraConfig(ensure_weight_tying=True) on a tiny tied Llama: PEFT's files load with PEFT's outputs and
gradients, ours load in PEFT, the head's factors are the embedding's (shared storage), merging folds the
shared delta once, and the cases PEFT warns about / lora_triton does not cover."""

from __future__ import annotations

import warnings

import pytest
import torch
from kinds_models import max_diff

import lora_triton as lt

peft = pytest.importorskip("peft", reason="PEFT is the oracle for tied adapters")
transformers = pytest.importorskip("transformers", reason="a tied-embedding causal LM")

IDS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))


def _llama(tie: bool = True):
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _train(model, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(IDS).logits.pow(2).mean().backward()
        opt.step()
    model.eval()


def _grads(model) -> dict:
    model.zero_grad()
    model(IDS).logits.pow(2).mean().backward()
    return {n.removeprefix("base_model.model."): p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad}


def _shares_embedding_storage(model) -> bool:
    emb, head = model.model.embed_tokens, model.lm_head
    return (head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
            and head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr())


def test_peft_tied_adapter_loads_with_peft_outputs_and_gradients(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4,
                                                           ensure_weight_tying=True, init_lora_weights=False))
        _train(pm)
        pm.save_pretrained(str(tmp_path))
        ours = lt.load_adapter(_llama(), str(tmp_path), is_trainable=True)
    assert isinstance(ours.lm_head, lt.nn.LoraLinear) and _shares_embedding_storage(ours)
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, pm(IDS).logits) <= 1e-5
    theirs_g, ours_g = _grads(pm), _grads(ours)
    assert sorted(theirs_g) == sorted(ours_g) and any(n.startswith("lm_head.lora_A") for n in ours_g)
    for n, g in ours_g.items():
        assert max_diff(g, theirs_g[n]) <= 1e-5 * (1 + theirs_g[n].abs().max().item()), n


def test_our_tied_adapter_loads_in_peft_and_merges_once(tmp_path):
    ours = lt.inject_lora(_llama(), lt.LoraConfig(target_modules=["embed_tokens"], r=4, ensure_weight_tying=True))
    emb = ours.model.embed_tokens
    # PEFT's init order: the head's init runs last on the shared storage (A zero, B kaiming-uniform).
    assert emb.lora_embedding_A["default"].abs().max() == 0 and emb.lora_embedding_B["default"].abs().max() > 0
    assert _shares_embedding_storage(ours)
    _train(ours)
    assert emb.lora_embedding_A["default"].abs().max() > 0
    lt.save_adapter(ours, str(tmp_path))
    cfg = lt.LoraConfig.from_pretrained(str(tmp_path))
    assert cfg.ensure_weight_tying is True and "lm_head" not in cfg.target_modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        want = ours(IDS).logits
        assert max_diff(back(IDS).logits, want) <= 1e-5
        merged = lt.merge_and_unload(ours)  # one fold of the shared delta into the one table (PEFT folds two)
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        assert max_diff(merged(IDS).logits, want) <= 1e-4


def test_untied_model_warns_and_modules_to_save_route_is_refused():
    with pytest.warns(UserWarning, match="no tied modules were found"):
        lt.inject_lora(_llama(tie=False), lt.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True))
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="modules_to_save is not supported"):
        lt.inject_lora(model, lt.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                            ensure_weight_tying=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not lt.nn.adapter_configs(model)
