"""LoftQ: reconstruction error falls with the iterations on a real pretrained weight, exact for any
lora_alpha (PEFT's factors only at alpha = r), injection through LoraConfig on CPU, bad configs refused."""

import pytest
import torch
from models import max_diff, model_input, run, tiny_llama

import lora_triton
from lora_triton.nn.loftq import loftq, reconstruction_error
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
    with pytest.raises(NotImplementedError, match="4-bit only"):
        lora_triton.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(NotImplementedError, match="DoRA"):
        lora_triton.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 1}, use_dora=True)
    with pytest.raises(ValueError, match="loftq_iter"):
        lora_triton.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    model = lora_triton.quantize(tiny_llama())
    with pytest.raises(TypeError, match="full-precision"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq",
                                                              loftq_config={"loftq_iter": 1}))
