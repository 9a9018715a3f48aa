"""LoRA on nn.Embedding: PEFT's format both ways (outputs and gradients after training), padding_idx,
max_norm and embed_scale as PEFT; a gather of r-vectors (no dense delta); merge / unmerge; tied weights."""

from __future__ import annotations

import pytest
import torch
from kinds_models import call, conv_inputs, conv_net, max_diff, peft_both_ways, train_steps
from torch import nn

import lora_triton as lt

peft = pytest.importorskip("peft", reason="PEFT is the oracle for the embedding LoRA format")


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["emb", "proj"], r=3, lora_alpha=6),
    dict(target_modules=["emb", "c1"], r=2, lora_alpha=5, use_rslora=True, rank_pattern={"emb": 4}),
], ids=["emb-linear", "emb-conv-patterns"])
def test_embedding_lora_peft_both_ways(kwargs, tmp_path):
    peft_both_ways(conv_net, conv_inputs(), peft.LoraConfig(init_lora_weights=False, **kwargs), tmp_path)


class _Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(17, 6, **kw)

    def forward(self, ids):
        return self.emb(ids)


@pytest.mark.parametrize("kw", [dict(padding_idx=2), dict(max_norm=0.5, norm_type=1.5), dict(scale_grad_by_freq=True)])
def test_embedding_options_match_peft(kw, tmp_path):
    def build():
        torch.manual_seed(0)
        return _Emb(**kw)

    ids = torch.tensor([[2, 3, 3, 16, 0], [1, 2, 5, 5, 5]])
    peft_both_ways(build, {"ids": ids}, peft.LoraConfig(target_modules=["emb"], r=2, init_lora_weights=False),
                   tmp_path)


def test_gather_equals_dense_fp64_and_merge_roundtrip():
    torch.manual_seed(0)
    m = _Emb(padding_idx=0).double()
    lt.inject_lora(m, lt.LoraConfig(target_modules=["emb"], r=3, lora_alpha=7, init_lora_weights=False))
    layer = m.emb
    ids = torch.randint(0, 17, (4, 5))
    dense = layer.base_layer.weight + layer.delta_weight("default").double()
    assert max_diff(m(ids), dense[ids]) <= 1e-12
    ids[0, 0] = 0
    m(ids).sum().backward()
    assert layer.lora_embedding_A["default"].grad[:, 0].abs().max() == 0  # padding_idx gets no gradient
    want = m(ids).detach()
    lt.merge_adapter(m)
    assert max_diff(m(ids), want) <= 1e-12
    lt.unmerge_adapter(m)
    assert max_diff(m(ids), want) <= 1e-12


def test_default_init_is_identity_and_training_moves_it():
    net = conv_net()
    inputs = conv_inputs()
    want = call(net, inputs).detach()
    lt.inject_lora(net, lt.LoraConfig(target_modules=["emb"], r=2))
    assert net.emb.lora_embedding_A["default"].abs().max() == 0  # PEFT's init: A = 0, B ~ N(0, 1)
    assert max_diff(call(net, inputs), want) == 0
    train_steps(net, inputs)
    assert max_diff(call(net, inputs), want) > 1e-4


def test_embed_scale_scales_the_adapter_too():
    torch.manual_seed(0)
    m = _Emb()
    m.emb.embed_scale = 3.0
    lt.inject_lora(m, lt.LoraConfig(target_modules=["emb"], r=2, init_lora_weights=False))
    ids = torch.tensor([[1, 4, 9]])
    layer = m.emb
    want = layer.base_layer(ids) + 3.0 * layer.delta_weight("default")[ids]
    assert max_diff(m(ids), want) <= 1e-5


def test_tied_embedding_gpt2_targets_wte_and_keeps_the_tie(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                                bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                                embd_pdrop=0.0, attn_pdrop=0.0)).eval()

    inputs = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))}
    diffs = peft_both_ways(build, inputs, peft.LoraConfig(target_modules=["wte", "c_attn"], r=2,
                                                          init_lora_weights=False, fan_in_fan_out=True), tmp_path,
                           lr=2.0)
    assert diffs["peft->ours"] <= 1e-5
    model = build()
    lt.inject_lora(model, lt.LoraConfig(target_modules=["wte"], r=2))
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight  # the tie survives the wrap


def test_lora_bias_on_embedding_refused():
    m = _Emb()
    with pytest.raises(ValueError, match="lora_bias=True is not supported on nn.Embedding"):
        lt.inject_lora(m, lt.LoraConfig(target_modules=["emb"], lora_bias=True))
    assert type(m.emb) is nn.Embedding
