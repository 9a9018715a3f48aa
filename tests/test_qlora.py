"""QLoRA: the 4-bit op against fp64 (outputs and every gradient), LoRA on a quantized model end to end
(inject, train, save/load, merge/unmerge/unload), and adapter exchange with PEFT over bitsandbytes."""

import copy
import warnings

import pytest
import torch
from models import bnb_nf4, max_diff, model_input, randomize_lora, run, tiny_llama
from torch import nn

import lora_triton
from lora_triton.nn.nf4_linear import NF4Linear
from lora_triton.ops.lora_linear import lora_linear
from lora_triton.ops.nf4_linear import nf4_lora_linear

SHAPES = [(1, 64, 7, 1), (13, 96, 33, 4), (5, 80, 64, 3)]  # M, K, N, r: M=1, r=1, sizes off any block grid


def _layer(k, n, dtype=torch.float32, double_quant=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NF4Linear.from_weight(torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None,
                                 double_quant=double_quant, compute_dtype=dtype)


def _operands(m, k, n, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    a = (torch.randn(r, k, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(n, r, generator=g) * 0.3).requires_grad_()
    return x, a, b


def _grads(y, dy, tensors):
    return torch.autograd.grad(y, tensors, dy)


def test_chunk_buffers_made_under_inference_mode_serve_a_later_training_step(monkeypatch):
    # The dequantization scratch is kept per thread: made by an inference-mode forward, it must still take
    # the in-place writes of a later forward + backward outside inference mode.
    from lora_triton.reference import nf4 as ref_nf4

    monkeypatch.setattr(ref_nf4._SCRATCH, "buffers", {})
    layer = _layer(64, 48)
    x, a, b = _operands(5, 64, 48, 4, torch.float32)
    with torch.inference_mode():
        want = nf4_lora_linear(x.detach(), layer.nf4_weight(), None, a.detach(), b.detach(), 1.5)
    y = nf4_lora_linear(x, layer.nf4_weight(), None, a, b, 1.5)
    assert torch.equal(y.detach(), want)
    assert all(g is not None for g in _grads(y, torch.ones_like(y), (x, a, b)))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_op_matches_fp64_and_dequantized_lora_linear(m, k, n, r, double_quant, p):
    layer = _layer(k, n, double_quant=double_quant)
    x, a, b = _operands(m, k, n, r, torch.float32)
    bias = layer.bias.detach().clone().requires_grad_()
    s, seed = 1.7, 1234
    y = nf4_lora_linear(x, layer.nf4_weight(), bias, a, b, s, p, seed)
    dy = torch.randn_like(y)
    got = _grads(y, dy, (x, a, b, bias))
    # Same math on the dequantized weight through the plain LoRA op (same Philox mask) and in fp64.
    w = layer.dequantize(torch.float32)
    want_y = lora_linear(x, w, bias, a, b, s, p, seed)
    want = _grads(want_y, dy, (x, a, b, bias))
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (x, a, b, bias))
    y64 = lora_linear(x64, w.double(), bias64, a64, b64, s, p, seed)
    exact = _grads(y64, dy.double(), (x64, a64, b64, bias64))
    for ours, same, ref in zip((y, *got), (want_y, *want), (y64, *exact)):
        err_ours, err_same = max_diff(ours, ref), max_diff(same, ref)
        assert err_ours <= 2 * err_same + 1e-5, (err_ours, err_same)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_op_without_adapter(dtype):
    layer = _layer(64, 24, dtype=dtype)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 24) and y.dtype == dtype
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    w = layer.dequantize(torch.float64)
    torch.testing.assert_close(y.double(), x.double() @ w.t() + layer.bias.double(), rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(dx.double(), torch.ones(3, 5, 24, dtype=torch.float64) @ w, rtol=2e-3, atol=2e-2)


def test_op_rejects_bad_operands_before_computing():
    layer = _layer(64, 8)
    w = layer.nf4_weight()
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="lora_A must be"):
        nf4_lora_linear(x, w, None, torch.randn(2, 63), torch.randn(8, 2))
    with pytest.raises(ValueError, match="both be given"):
        nf4_lora_linear(x, w, None, torch.randn(2, 64), None)
    with pytest.raises(ValueError, match="absmax must be"):
        nf4_lora_linear(x, w._replace(absmax=w.absmax[:-1]), None)
    with pytest.raises(ValueError, match="packed weight must be"):
        nf4_lora_linear(x, w._replace(packed=w.packed[:-1]), None)
    a, b = torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(TypeError, match="dropout_p"):
        nf4_lora_linear(x, w, None, a, b, dropout_p="0.1")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        nf4_lora_linear(x, w, None, a, b, dropout_p=float("nan"))
    with pytest.raises(ValueError, match="scaling must be finite"):
        nf4_lora_linear(x, w, None, a, b, scaling=float("inf"))


def _quantized_llama(seed=0):
    return lora_triton.quantize(tiny_llama(seed))


def test_qlora_trains_saves_loads_and_merges(tmp_path):
    model = _quantized_llama()
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    config = lora_triton.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.1)
    lora_triton.inject_lora(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = model_input("llama", batch=4, seq=8)
    labels = inputs["input_ids"]
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # the 4-bit base never moves
    model.eval()
    with torch.no_grad():
        trained = run(model, inputs)
    lora_triton.save_adapter(model, str(tmp_path))
    fresh = _quantized_llama()
    lora_triton.load_adapter(fresh, str(tmp_path))
    fresh.eval()  # the LoraLinear wrappers are created in training mode (dropout on)
    with torch.no_grad():
        assert max_diff(run(fresh, inputs), trained) == 0.0
    # merge: full-precision Linears holding W_deq + s B A; unmerge restores the 4-bit layers bit for bit
    packed_before = {k: v.clone() for k, v in fresh.state_dict().items()}
    lora_triton.merge_adapter(fresh)
    kinds = {type(layer.base_layer) for _, layer in lora_triton.nn.lora_layers(fresh)}
    assert kinds == {nn.Linear}
    with torch.no_grad():
        assert max_diff(run(fresh, inputs), trained) < 1e-4
    lora_triton.unmerge_adapter(fresh)
    after = fresh.state_dict()
    assert set(after) == set(packed_before) and all(torch.equal(after[k], v) for k, v in packed_before.items())
    merged = lora_triton.merge_and_unload(fresh)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert max_diff(run(merged, inputs), trained) < 1e-4


def test_merge_is_one_rounding_and_scales_lora_bias():
    base = _layer(64, 16, dtype=torch.bfloat16)
    layer = lora_triton.LoraLinear(base, r=2, lora_alpha=6, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_B["default"].bias.normal_()
    s = layer.scaling["default"]
    exact_w = base.dequantize(torch.float32) + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    exact_b = base.bias.float() + s * layer.lora_B["default"].bias
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base_layer.weight, exact_w.to(torch.bfloat16))
    assert torch.equal(layer.base_layer.bias, exact_b.to(torch.bfloat16))  # scaled, unlike PEFT's 4-bit merge
    layer.unmerge()
    assert layer.base_layer is base


def test_merge_and_unload_requantize_warns():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    lora_triton.quantize(model, blocksize=32)
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["0", "2"], r=2))
    randomize_lora(model)
    with pytest.warns(UserWarning, match="rounds the merged weights to 4 bits again"):
        lora_triton.merge_and_unload(model, requantize=True)
    assert isinstance(model[0], NF4Linear) and model[0].blocksize == 32


def test_multi_adapter_mixed_batch_and_pool_over_4bit_base():
    model = _quantized_llama()
    cfg = lora_triton.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False)
    lora_triton.inject_lora(model, cfg, "a")
    lora_triton.inject_lora(model, cfg, "b")
    randomize_lora(model)
    inputs = model_input("llama", batch=2)
    outs = {}
    with torch.no_grad():
        for name in ("a", "b"):
            lora_triton.set_adapter(model, name)
            outs[name] = run(model, inputs)
        with lora_triton.adapter_batch(model, ["a", "b"]):
            mixed = run(model, inputs)
    assert max_diff(mixed[0], outs["a"][0]) < 1e-4 and max_diff(mixed[1], outs["b"][1]) < 1e-4


def test_peft_bnb_model_loads_our_adapter_with_same_outputs(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="PEFT's 4-bit path needs bitsandbytes")
    peft = pytest.importorskip("peft")
    reference = tiny_llama()
    bnb_model = bnb_nf4(copy.deepcopy(reference), bnb)
    ours = lora_triton.quantize(copy.deepcopy(bnb_model))  # adopted: the very same bytes
    lora_triton.inject_lora(ours, lora_triton.LoraConfig(target_modules=["q_proj", "o_proj", "up_proj"], r=4,
                                                         lora_alpha=16))
    randomize_lora(ours)
    lora_triton.save_adapter(ours, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(bnb_model, str(tmp_path)).eval()
    assert any(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in peft_model.modules())
    inputs = model_input("llama")
    # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks the weight at the first eval-mode no-grad forward and
    # then computes in bf16 (error ~0.1); in training mode (no dropout here) it dequantizes in fp32.
    peft_model.train()
    with torch.no_grad():
        assert max_diff(run(peft_model, inputs), run(ours.eval(), inputs)) < 1e-4


def test_qlora_benchmark_module_runs_at_a_tiny_shape():
    pytest.importorskip("bitsandbytes", reason="the benchmark compares against PEFT + bitsandbytes")
    from lora_triton.benchmark.qlora import run_shape

    run = run_shape(32, 64, 16, 2, repeats=1, warmup=0, device=torch.device("cpu"))
    assert set(run["results"]) == {"qlora_lora_triton", "peft_bnb", "frozen_fp32"}
    ours = run["results"]["qlora_lora_triton"]
    n = 32 * 64  # packed bytes + one uint8 code per block of 64 + one fp32 per 256 blocks (rounded up)
    assert ours["weight_bytes_per_param"] == pytest.approx((n / 2 + n / 64 + 4) / n)
    assert ours["train_s"] > 0 and ours["infer_s"] > 0 and ours["train_cpu_s"] > 0
    # y [16, 32] + dx [16, 64] fp32, plus (inside the custom op) the dequantized W [32, 64] fp32 and its
    # int32 byte index: temporaries of an opaque custom op are counted, x / dy / parameters are not.
    y_dx = 4 * (16 * 32 + 16 * 64)
    assert run["results"]["frozen_fp32"]["step_peak_bytes"] == y_dx
    assert ours["step_peak_bytes"] >= y_dx + 4 * n + 4 * n // 2


def test_adapter_pool_over_4bit_base(tmp_path):
    model = _quantized_llama()
    lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["q_proj", "v_proj"], r=2,
                                                          init_lora_weights=False))
    randomize_lora(model)
    lora_triton.save_adapter(model, str(tmp_path / "a"))
    inputs = model_input("llama", batch=2)
    with torch.no_grad():
        want = run(model.eval(), inputs)
    pool = lora_triton.AdapterPool(_quantized_llama(), num_slots=2, max_rank=4, target_modules=["q_proj", "v_proj"])
    pool.load("a", str(tmp_path / "a"))
    with torch.no_grad(), pool.batch(["a", "a"]):
        got = run(pool.model, inputs)
    assert max_diff(got, want) < 1e-4


def test_compile_fullgraph_through_the_4bit_op():
    layer = lora_triton.LoraLinear(_layer(64, 24), r=2, lora_dropout=0.1).train()
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (5, 24) and x.grad is not None and layer.lora_A["default"].weight.grad is not None


def test_demo_qlora_runs_on_the_tiny_model():
    pytest.importorskip("transformers")
    from lora_triton.demo.run import main

    assert main(["--qlora", "--model", "tiny", "--epochs", "1", "--quiet"]) == 0


def test_inference_then_training_keeps_the_packed_bytes():
    # bitsandbytes 0.50 on CPU repacks its weight at the first eval-mode no-grad forward and the next
    # training step fails; the 4-bit storage here never changes layout.
    layer = lora_triton.LoraLinear(_layer(64, 24), r=2, init_lora_weights=False)
    packed = layer.base_layer.weight.clone()
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = layer.eval()(x)
    layer.train()
    layer(x.requires_grad_()).sum().backward()
    assert torch.equal(layer.base_layer.weight, packed) and x.grad is not None
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), before)


def test_linear_features_of_every_supported_base():
    from transformers.pytorch_utils import Conv1D

    from lora_triton.nn import kinds
    from lora_triton.nn.lora_linear import linear_features

    lin, conv1d = nn.Linear(12, 20), Conv1D(20, 12)  # Conv1D(nf=out, nx=in): weight [in, out]
    nf4 = NF4Linear.from_weight(torch.randn(20, 12))  # packed bytes [120, 1]: not the layer's shape
    cfg = lora_triton.LoraConfig(r=3, target_modules=["x"])
    for base in (lin, conv1d, nf4):
        assert linear_features(base) == (12, 20)
        assert kinds.LORA_LINEAR.shapes(base, cfg, "x") == {"lora_A.weight": (3, 12), "lora_B.weight": (20, 3)}
        layer = lora_triton.LoraLinear(base, r=3)
        assert (layer.in_features, layer.out_features) == (12, 20)
