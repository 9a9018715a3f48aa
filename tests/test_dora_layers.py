"""DoRA on nn.Embedding, nn.Conv1d/2d/3d, a 4-bit base and as a non-first active adapter, against the real
PEFT (0.21.2): PEFT-trained adapters (m moved by a few Adam steps) load here with the same outputs (fp32,
1e-5) and ours load in PEFT; one step's gradients of every A, B and m equal PEFT's; merge / unmerge."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from models import bnb_nf4, max_diff, model_input, run, tiny_llama
from test_dora_peft import _train
from torch import nn

import lora_triton

TOL = 1e-5
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class EmbConv(nn.Module):
    """Embedding -> Conv1d -> Conv2d -> Conv3d -> head, every layer type DoRA can take here."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, (3, 2), padding=1, bias=False)
        self.c3 = nn.Conv3d(5, 4, (1, 2, 2), stride=(1, 1, 2))
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.c1(self.emb(ids).transpose(1, 2))  # [B, 6, L]
        h = self.c2(torch.tanh(h).unsqueeze(-1).expand(-1, -1, -1, 3))  # [B, 5, L + 2, 4]
        h = self.c3(torch.tanh(h).unsqueeze(2))  # [B, 4, 1, L + 1, 2]
        return self.head(torch.tanh(h).mean((2, 3, 4)))


def emb_conv(seed: int = 0) -> EmbConv:
    torch.manual_seed(seed)
    return EmbConv().eval()


IDS = {"ids": torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(5))}
TARGETS = ["emb", "c1", "c2", "c3"]


def _config(cls, **kw):
    return cls(target_modules=TARGETS, r=2, lora_alpha=5, use_dora=True, **kw)


def _magnitudes(model) -> dict:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}


def test_peft_trained_embedding_and_conv_dora_loads_here(tmp_path):
    pm = _train(peft.get_peft_model(emb_conv(), _config(peft.LoraConfig)), IDS)
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = run(pm, IDS)
        model = lora_triton.load_adapter(emb_conv(), str(tmp_path)).eval()
        got = run(model, IDS)
        with lora_triton.disable_adapters(model):
            base = run(model, IDS)
    assert max_diff(got, base) > 1e-3
    assert max_diff(got, expected) <= TOL
    ours, theirs = _magnitudes(model), _magnitudes(pm)
    assert sorted(ours) == sorted(theirs) and len(ours) == 4
    for name, p in ours.items():
        assert p.shape == theirs[name].shape and torch.equal(p, theirs[name]), name
        layer = model.get_submodule(name.split(".lora_magnitude_vector")[0])
        norm = layer.lora_variant["default"].weight_norm(layer, "default")
        assert (p.reshape(-1) - norm).abs().max() > 1e-4, f"{name}: training should move m off the norm"


def test_our_trained_embedding_and_conv_dora_loads_in_peft(tmp_path):
    model = lora_triton.inject_lora(emb_conv(), _config(lora_triton.LoraConfig))
    _train(model, IDS)
    lora_triton.save_adapter(model, str(tmp_path))
    with torch.no_grad():
        expected = run(model, IDS)
        pm = peft.PeftModel.from_pretrained(emb_conv(), str(tmp_path)).eval()
        assert max_diff(run(pm, IDS), expected) <= TOL


def _same_adapter_in_both(tmp_path, cfg_kw=None, builder=emb_conv):
    """PEFT's model with random factors and moved magnitudes, and ours loaded from its files (trainable)."""
    pm = peft.get_peft_model(builder(), _config(peft.LoraConfig, init_lora_weights=False, **(cfg_kw or {})))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.5 if "magnitude" not in n else 1.0)
                if "magnitude" in n:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(n))))
    pm.save_pretrained(str(tmp_path))
    return pm, lora_triton.load_adapter(builder(), str(tmp_path), is_trainable=True)


def _grads(model, inputs, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad()
    out = run(model, inputs)
    out.float().pow(2).mean().backward()
    return out.detach(), {n.removeprefix(PREFIX): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_embedding_and_conv_gradients_equal_peft(dropout, tmp_path):
    """p = 0 and p > 0 (the same torch generator state: both draw the conv masks with F.dropout)."""
    pm, model = _same_adapter_in_both(tmp_path, {"lora_dropout": dropout})
    out_t, theirs = _grads(pm.train(), IDS, seed=7)
    out_o, ours = _grads(model.train(), IDS, seed=7)
    assert max_diff(out_o, out_t) <= TOL
    assert sorted(ours) == sorted(theirs) and sum("magnitude" in n for n in ours) == 4
    for name, grad in ours.items():
        scale = theirs[name].abs().max().item()
        assert scale > 0, name
        assert max_diff(grad, theirs[name]) <= TOL * max(1.0, scale), name


def test_embedding_and_conv_merge_unmerge_equal_peft(tmp_path):
    pm, model = _same_adapter_in_both(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = run(model, IDS)
        before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
        lora_triton.merge_adapter(model, safe_merge=True)
        assert max_diff(run(model, IDS), expected) <= 1e-5
        pm.merge_adapter()
        theirs = {n.removeprefix(PREFIX): p for n, p in pm.named_parameters() if "base_layer" in n}
        for n, p in model.named_parameters():
            if "base_layer" in n:
                assert max_diff(p, theirs[n]) <= 1e-6 * max(1.0, p.abs().max().item()), n  # one fp32 rounding
        lora_triton.unmerge_adapter(model)
        for n, p in model.named_parameters():
            if n in before:
                assert max_diff(p, before[n]) <= 1e-6 * max(1.0, p.abs().max().item()), n
        assert max_diff(run(model, IDS), expected) <= 1e-5
        merged = lora_triton.merge_and_unload(copy.deepcopy(model))
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert max_diff(run(merged, IDS), expected) <= 1e-5


def test_grouped_conv_dora_is_refused_and_delete_removes_the_magnitude():
    from lora_triton.nn.lora_conv import LoraConv

    with pytest.raises(NotImplementedError, match="groups=2"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2), r=2, use_dora=True)
    layer = LoraConv(nn.Conv1d(4, 6, 3), r=2, use_dora=True)
    layer.add_adapter("other", 2, 4)
    layer.delete_adapter("default")
    assert "default" not in layer.lora_magnitude_vector and "default" not in layer.lora_variant


# -- DoRA as a non-first active adapter -----------------------------------------------------------------
def _two_adapters_peft(builder, targets, dropout):
    """PEFT: plain LoRA "a" (no dropout) then DoRA "b" (dropout), both active, random factors."""
    torch.manual_seed(11)
    pm = peft.get_peft_model(builder(), peft.LoraConfig(target_modules=targets, r=3, lora_alpha=6,
                                                        init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4, lora_dropout=dropout,
                                        use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.4 if "magnitude" not in n else 1.2)
    pm.base_model.set_adapter(["a", "b"])
    return pm


def _ours_from(pm, builder, tmp_path):
    pm.save_pretrained(str(tmp_path))
    model = builder()
    for name in ("a", "b"):
        lora_triton.load_adapter(model, str(tmp_path / name) if name != "a" else str(tmp_path), adapter_name=name,
                                 is_trainable=True)
    lora_triton.set_adapter(model, ["a", "b"])
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["llama", "emb_conv"])
def test_dora_after_another_active_adapter_equals_peft(kind, dropout, tmp_path):
    builder, targets, inputs = ((tiny_llama, ["q_proj", "v_proj", "down_proj"], model_input("llama")) if kind == "llama"
                                else (emb_conv, TARGETS, IDS))
    pm = _two_adapters_peft(builder, targets, dropout)
    model = _ours_from(pm, builder, tmp_path)
    out_t, theirs = _grads(pm.train(), inputs, seed=3)
    out_o, ours = _grads(model.train(), inputs, seed=3)
    assert max_diff(out_o, out_t) <= TOL * max(1.0, out_t.abs().max().item())
    assert sorted(ours) == sorted(theirs)
    for name, grad in ours.items():
        scale = theirs[name].abs().max().item()
        assert max_diff(grad, theirs[name]) <= TOL * max(1.0, scale), name
    pm.eval()
    model.eval()
    with torch.no_grad():
        expected = run(pm, inputs)
        assert max_diff(run(model, inputs), expected) <= TOL * max(1.0, out_t.abs().max().item())
        if dropout:
            return
        lora_triton.merge_adapter(model)  # both, in order: the DoRA fold scales the plain adapter merged first
        pm.merge_adapter()
        assert max_diff(run(model, inputs), expected) <= 1e-4 * max(1.0, out_t.abs().max().item())
        theirs_w = {n.removeprefix(PREFIX): p for n, p in pm.named_parameters() if "base_layer" in n}
        for n, p in model.named_parameters():
            if "base_layer" in n:
                assert max_diff(p, theirs_w[n]) <= 1e-6 * max(1.0, p.abs().max().item()), n


# -- DoRA over a 4-bit base ------------------------------------------------------------------------
def _bnb_llama():
    bnb = pytest.importorskip("bitsandbytes", reason="PEFT's 4-bit DoRA needs bitsandbytes")
    return bnb_nf4(tiny_llama(), bnb)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_over_a_4bit_base_equals_peft_over_bitsandbytes(dropout, tmp_path):
    bnb_model = _bnb_llama()
    ours_base = lora_triton.quantize(copy.deepcopy(bnb_model))  # adopted: the very same bytes
    cfg = dict(target_modules=["q_proj", "o_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True,
               init_lora_weights=False, lora_dropout=dropout)
    pm = peft.get_peft_model(bnb_model, peft.LoraConfig(**cfg))
    assert any(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in pm.modules())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.3 if "magnitude" not in n else 1.1)
    pm.save_pretrained(str(tmp_path))
    model = lora_triton.load_adapter(ours_base, str(tmp_path), is_trainable=True)
    inputs = model_input("llama")
    # bitsandbytes 0.50 on CPU repacks at the first eval-mode no-grad forward and then computes in bf16, so
    # PEFT runs in training mode: it dequantizes in fp32. Same generator state: the same dropout masks.
    out_t, theirs = _grads(pm.train(), inputs, seed=4)
    out_o, ours = _grads(model.train(), inputs, seed=4)
    assert max_diff(out_o, out_t) <= TOL
    assert sorted(ours) == sorted(theirs) and any("magnitude" in n for n in ours)
    for name, grad in ours.items():
        scale = theirs[name].abs().max().item()
        assert max_diff(grad, theirs[name]) <= TOL * max(1.0, scale), name
    # merge: a full-precision Linear holding (m / n)(W_deq + s B A); unmerge restores the 4-bit base
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
        lora_triton.merge_adapter(model)
        assert max_diff(run(model, inputs), expected) <= 1e-4
        lora_triton.unmerge_adapter(model)
        assert max_diff(run(model, inputs), expected) == 0.0
    if dropout == 0.0:  # ours, after an optimizer step on the 4-bit base, loads in PEFT + bitsandbytes
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        lora_triton.save_adapter(model, str(tmp_path / "ours"))
        theirs = peft.PeftModel.from_pretrained(_bnb_llama(), str(tmp_path / "ours")).train()
        with torch.no_grad():
            assert max_diff(run(model.eval(), inputs), expected) > 1e-3
            assert max_diff(run(theirs, inputs), run(model, inputs)) <= TOL


def test_4bit_dora_norm_is_chunked_and_equals_the_dense_norm(monkeypatch):
    from lora_triton.nn import LoraLinear
    from lora_triton.nn.nf4_linear import NF4Linear
    from lora_triton.reference import nf4 as nf4_ref

    g = torch.Generator().manual_seed(0)
    base = NF4Linear.from_weight(torch.randn(300, 96, generator=g), torch.randn(300, generator=g))
    layer = LoraLinear(base, r=3, lora_alpha=6, use_dora=True, init_lora_weights=False)
    dense = base.dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = torch.linalg.vector_norm(dense.double() + 2.0 * (b @ a).double(), dim=1)
    monkeypatch.setattr(nf4_ref, "CHUNK_ELEMENTS", 96 * 64)  # several chunks of rows
    assert len(list(base.nf4_weight().row_chunks())) > 1
    layer.lora_variant["default"]._norm = None
    got = layer.lora_variant["default"].weight_norm(layer, "default")
    assert max_diff(got, expected) <= 1e-5 * expected.max().item()
    x = torch.randn(5, 96, generator=g)
    m = layer.lora_magnitude_vector["default"].weight
    want = (m / expected.float()) * (x @ (dense + 2.0 * (b @ a)).t()) + base.bias
    assert max_diff(layer(x), want) <= 1e-4


def test_embedding_and_conv_dora_in_a_mixed_batch():
    model = lora_triton.inject_lora(emb_conv(), _config(lora_triton.LoraConfig), "a")
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=TARGETS, r=2, init_lora_weights=False), "b")
    for name in ("a", "b"):  # both adapters trained: B != 0, m off the norm
        lora_triton.set_adapter(model, name)
        _train(model, IDS, steps=2)
    ids = {"ids": IDS["ids"][:2]}
    with torch.no_grad():
        outs = {}
        for name in ("a", "b"):
            lora_triton.set_adapter(model, name)
            outs[name] = run(model, ids)
        with lora_triton.adapter_batch(model, ["a", "b"]):
            mixed = run(model, ids)
    assert max_diff(outs["a"], outs["b"]) > 1e-3
    assert max_diff(mixed[0], outs["a"][0]) <= TOL and max_diff(mixed[1], outs["b"][1]) <= TOL


def test_norm_cache_hits_through_views_and_misses_after_a_step():
    """The norm is keyed on the tensor owning W's storage: GPT-2's Conv1D (W^T), the embedding (E^T) and a
    conv kernel (flattened) are views rebuilt every call, yet two forwards compute n once; a step recomputes."""
    from transformers.pytorch_utils import Conv1D

    from lora_triton.nn import LoraLinear
    from lora_triton.nn.lora_conv import LoraConv
    from lora_triton.nn.lora_embedding import LoraEmbedding

    torch.manual_seed(0)
    cases = [(LoraLinear(Conv1D(6, 8), r=2, use_dora=True, init_lora_weights=False), torch.randn(3, 8)),
             (LoraEmbedding(nn.Embedding(10, 6), r=2, use_dora=True, init_lora_weights=False),
              torch.tensor([[1, 4, 9]])),
             (LoraConv(nn.Conv2d(3, 4, 3), r=2, use_dora=True, init_lora_weights=False), torch.randn(1, 3, 5, 5))]
    for layer, x in cases:
        variant = layer.lora_variant["default"]
        layer(x).sum().backward()
        before = variant.norm_computations
        layer(x).sum().backward()
        assert variant.norm_computations == before, type(layer).__name__
        torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1).step()
        layer(x)
        assert variant.norm_computations == before + 1, type(layer).__name__
