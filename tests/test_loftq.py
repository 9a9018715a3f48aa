"""LoftQ: reconstruction error falls with the iterations on a real pretrained weight, exact for any
lora_alpha (PEFT's factors only at alpha = r), injection through LoraConfig on CPU, bad configs refused."""

import pytest
import torch
from models import max_diff, model_input, run, tiny_llama
from torch import nn

import lora_triton
from lora_triton.nn.loftq import int8_rowwise_dequantized, loftq, reconstruction_error
from lora_triton.nn.nf4_linear import NF4Linear


def _pretrained_weight() -> tuple[str, torch.Tensor]:
    """A MiniLM attention weight (the demo's model) when installed, else a heavy-tailed synthetic matrix."""
    from lora_triton.demo.models import minilm_path, transformers_available

    path = minilm_path()
    if path is not None and transformers_available():
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if files:
            with safe_open(str(files[0]), framework="pt") as f:  # one tensor, not the whole model
                key = next(k for k in sorted(f.keys()) if k.endswith("layer.0.attention.self.query.weight"))
                return "minilm:" + key, f.get_tensor(key).float()
    g = torch.Generator().manual_seed(0)
    low = torch.randn(384, 8, generator=g) @ torch.randn(8, 384, generator=g) / 8
    return "synthetic", low + 0.05 * torch.distributions.StudentT(3.0).sample((384, 384))


def test_reconstruction_error_falls_with_iterations():
    name, w = _pretrained_weight()
    plain = NF4Linear.from_weight(w, double_quant=False)
    base_err = (torch.linalg.matrix_norm(w - plain.dequantize()) / torch.linalg.matrix_norm(w)).item()
    r, s = 16, 2.0
    errors = []  # after iteration 1..5 of one run: what loftq_iter = 1..5 give
    q, a, b = loftq(w, r, s, 5, history=errors)
    assert errors[-1] == pytest.approx(reconstruction_error(w, q, a, b, s), rel=1e-4)
    print(f"LoftQ on {name}: ||W - deq(Q)|| / ||W|| = {base_err:.5f}; with s*B*A, iter 1..5: "
          + ", ".join(f"{e:.5f}" for e in errors))
    assert errors[0] < base_err
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_exact_for_any_alpha_and_peft_identical_mode():
    _, w = _pretrained_weight()
    w = w[:128, :192]
    r = 8
    q1, a1, b1 = loftq(w, r, 1.0, 2)
    q4, a4, b4 = loftq(w, r, 4.0, 2)  # lora_alpha = 4 r
    assert torch.equal(q1.weight, q4.weight) and torch.equal(q1.absmax, q4.absmax)
    e1, e4 = reconstruction_error(w, q1, a1, b1, 1.0), reconstruction_error(w, q4, a4, b4, 4.0)
    assert e4 == pytest.approx(e1, rel=1e-4)
    qp, ap, bp = loftq(w, r, 4.0, 2, peft_identical=True)
    assert torch.allclose(ap, a1, atol=1e-6) and torch.allclose(bp, b1, atol=1e-6)  # PEFT's factors ignore s
    assert reconstruction_error(w, qp, ap, bp, 4.0) > e1  # ...so at s = 4 they overshoot


def test_loftq_through_lora_config_on_cpu(tmp_path):
    full = tiny_llama()
    inputs = model_input("llama")
    with torch.no_grad():
        want = run(full, inputs)
    plain = lora_triton.quantize(tiny_llama())
    config = lora_triton.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=16,
                                    init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 3})
    model = lora_triton.inject_lora(tiny_llama(), config)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer.base_layer, NF4Linear) and not layer.base_layer.double_quant
    model.eval()
    with torch.no_grad():
        got, base_only = run(model, inputs), run(plain, inputs)
    # only the targeted layers are 4-bit in `model`; their LoftQ correction must beat plain 4-bit weights
    assert max_diff(got, want) < max_diff(base_only, want)
    lora_triton.save_adapter(model, str(tmp_path))
    assert lora_triton.LoraConfig.from_pretrained(str(tmp_path)).init_lora_weights == "loftq"


def test_bad_loftq_configs_raise():
    with pytest.raises(ValueError, match="loftq_config"):
        lora_triton.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits must be one of"):
        lora_triton.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(ValueError, match="loftq_iter"):
        lora_triton.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    model = lora_triton.quantize(tiny_llama())
    with pytest.raises(TypeError, match="full-precision"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq",
                                                              loftq_config={"loftq_iter": 1}))


def test_8bit_quantizer_is_bitsandbytes_int8_and_errors_fall():
    _, w = _pretrained_weight()
    deq = int8_rowwise_dequantized(w)
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the int8 oracle")
    q, stats, _ = bnbf.int8_vectorwise_quant(w.half())  # what PEFT's Int8Params stores (on the GPU)
    assert torch.equal(deq, bnbf.int8_vectorwise_dequant(q, stats))
    errors = []
    q8, a, b = loftq(w, 16, 2.0, 3, history=errors, bits=8)
    plain = (torch.linalg.matrix_norm(w - deq) / torch.linalg.matrix_norm(w)).item()
    assert errors[-1] == pytest.approx(reconstruction_error(w, q8, a, b, 2.0), rel=1e-4)
    print(f"LoftQ 8-bit: int8 alone {plain:.5f}; iter 1..3: " + ", ".join(f"{e:.5f}" for e in errors))
    assert errors[0] < plain and errors[-1] <= errors[0] + 1e-7


def _embed_conv_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(96, 64))
    model.add_module("conv", nn.Conv2d(8, 32, 3, padding=1))
    model.add_module("proj", nn.Linear(64, 48))
    with torch.no_grad():
        for p in model.parameters():  # heavy-tailed weights: 4-bit error worth correcting
            p.copy_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.1)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_on_embedding_conv_and_8bit_targets(bits):
    reference = _embed_conv_model()
    config = lambda it: lora_triton.LoraConfig(  # noqa: E731
        target_modules=["embed", "conv", "proj"], r=4, lora_alpha=12, init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": it})
    errs = {}
    for it in (1, 3):
        model = lora_triton.inject_lora(_embed_conv_model(), config(it))
        emb, conv, proj = model.embed, model.conv, model.proj
        assert type(emb).__name__ == "LoraEmbedding" and type(conv).__name__ == "LoraConv"
        assert isinstance(proj.base_layer, NF4Linear) == (bits == 4)
        for name, layer in (("embed", emb), ("conv", conv), ("proj", proj)):
            want = getattr(reference, name).weight.detach()
            base = layer.base_layer
            deq = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.detach()
            err_q = (torch.linalg.matrix_norm((want - deq).flatten(1)) / torch.linalg.matrix_norm(want.flatten(1)))
            got = deq + layer.delta_weight("default").reshape(want.shape)
            err = (torch.linalg.matrix_norm((want - got).flatten(1)) / torch.linalg.matrix_norm(want.flatten(1)))
            assert err < err_q, (name, it, err, err_q)  # the adapter corrects the quantization error
            errs[name, it] = err.item()
    for name in ("embed", "conv", "proj"):
        assert errs[name, 3] <= errs[name, 1] + 1e-6, errs  # and more iterations do not undo it
    # the model's outputs follow: the LoftQ-initialised model is closer to the original than deq(Q) alone
    x_ids, img = torch.randint(0, 96, (5,)), torch.randn(2, 8, 6, 6)
    model.eval()
    with torch.no_grad():
        for name, inp in (("embed", x_ids), ("conv", img)):
            layer, ref = getattr(model, name), getattr(reference, name)
            adapted, base_only = layer(inp), layer.base_layer(inp)
            assert max_diff(adapted, ref(inp)) < max_diff(base_only, ref(inp))


def test_loftq_refuses_grouped_convs_before_changing_anything():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(8, 8, 3, groups=2))
    before = model.conv.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["conv"], r=4, init_lora_weights="loftq",
                                                              loftq_config={"loftq_iter": 1}))
    assert isinstance(model.conv, nn.Conv2d) and torch.equal(model.conv.weight, before)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_with_dora_initialises_the_magnitude_from_the_loftq_weight(bits):
    """PEFT's order: LoftQ sets deq(Q), A and B, then DoRA's m = ||deq(Q) + s B A|| per output row, so at init
    the DoRA model gives the LoftQ model's outputs (m / n = 1)."""
    config = lambda dora: lora_triton.LoraConfig(  # noqa: E731
        target_modules=["embed", "conv", "proj"], r=4, lora_alpha=12, init_lora_weights="loftq", use_dora=dora,
        loftq_config={"loftq_bits": bits, "loftq_iter": 2})
    plain = lora_triton.inject_lora(_embed_conv_model(), config(False)).eval()
    dora = lora_triton.inject_lora(_embed_conv_model(), config(True)).eval()
    for name in ("embed", "conv", "proj"):
        layer = getattr(dora, name)
        base = layer.base_layer
        deq = base.dequantize(torch.float64) if isinstance(base, NF4Linear) else base.weight.detach().double()
        w = deq + layer.delta_weight("default").double().reshape(deq.shape)
        # the norm is per output row: Embedding's outputs are its columns (PEFT's DoraEmbeddingLayer)
        want = w.norm(dim=0) if name == "embed" else w.flatten(1).norm(dim=1)
        got = layer.lora_magnitude_vector["default"].weight.double().reshape(-1)
        assert max_diff(got, want) < 1e-5 * want.abs().max(), name
    x_ids, img, vec = torch.randint(0, 96, (5,)), torch.randn(2, 8, 6, 6), torch.randn(3, 64)
    with torch.no_grad():
        for name, inp in (("embed", x_ids), ("conv", img), ("proj", vec)):
            a, b = getattr(dora, name)(inp), getattr(plain, name)(inp)
            assert max_diff(a, b) < 1e-5 * max(1.0, b.abs().max().item()), name
