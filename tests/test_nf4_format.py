"""NF4/FP4 storage: bit-exact against bitsandbytes (the oracle), transformers' state-dict layout both ways,
adoption of bnb-quantized models, and the NF4Linear module's behaviour (dtype moves, bad input)."""

import pytest
import torch
from torch import nn

import lora_triton
from lora_triton.nn.nf4_linear import NF4Linear
from lora_triton.reference import nf4

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for the 4-bit format")
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the 4-bit format")

CASES = [((64, 64), 64, torch.float32), ((7, 33), 64, torch.float32), ((130, 77), 128, torch.float16),
         ((300, 257), 32, torch.bfloat16), ((1, 5), 4096, torch.float32), ((96, 80), 256, torch.float32)]


def _bnb_dequantize(packed, state, shape):
    """bitsandbytes' dequantization. Its CPU C kernel (0.50.2) scales with the wrong absmax when the row
    length is even and not a multiple of the blocksize (relative error 0.2-0.5 instead of 0.1); its
    pure-PyTorch kernel is right, so that is the oracle in those cases."""
    if shape[-1] % 2 == 0 and shape[-1] % state.blocksize:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = state.absmax
        if state.nested:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, shape, state.dtype)
    return F.dequantize_4bit(packed, state)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed rows of different scales, like trained weights
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    return (w + 0.1 * torch.randn(shape, generator=g) ** 3).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize,dtype", CASES)
def test_packing_absmax_and_dequant_equal_bitsandbytes(shape, blocksize, dtype, quant_type):
    w = _weight(shape, dtype)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    packed, absmax = nf4.quantize_4bit(w, blocksize, quant_type)
    assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(nf4.code_table(quant_type), ref_state.code)
    ours = nf4.dequantize_4bit(packed, absmax, nf4.code_table(quant_type), blocksize, shape, dtype)
    assert torch.equal(ours, _bnb_dequantize(ref_packed, ref_state, shape))


@pytest.mark.parametrize("shape,blocksize,dtype", CASES)
def test_double_quant_matches_bitsandbytes(shape, blocksize, dtype):
    w = _weight(shape, dtype, seed=1)
    ref_packed, st = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    _, absmax = nf4.quantize_4bit(w, blocksize, "nf4")
    q, nested, code2, offset = nf4.double_quantize(absmax)
    assert torch.equal(code2, st.state2.code) and torch.equal(code2, F.create_dynamic_map())
    assert offset == st.offset.item()
    assert torch.equal(nested, st.state2.absmax)
    # bitsandbytes' C binary search picks the other neighbour at a few exact-midpoint ties (about 7e-5 of
    # values in a dense sweep): one code step apart, never more, and rare.
    diff = (q.int() - st.absmax.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() <= 0.01
    # Decoding the same stored state gives bitsandbytes' values bit for bit.
    ours = nf4.dequantize_4bit(ref_packed, st.absmax, st.code, blocksize, shape, dtype, st.state2.absmax,
                               st.state2.code, st.offset.item())
    assert torch.equal(ours, _bnb_dequantize(ref_packed, st, shape))


def test_chunked_dequantization_equals_whole(monkeypatch):
    w = _weight((37, 96), torch.float32, seed=2)
    packed, absmax = nf4.quantize_4bit(w, 64, "nf4")
    q, nested, code2, off = nf4.double_quantize(absmax)
    whole = nf4.dequantize_4bit(packed, q, nf4.code_table("nf4"), 64, (37, 96), torch.float32, nested, code2, off)
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 400)  # chunks of whole blocks, several per weight
    packed2, absmax2 = nf4.quantize_4bit(w, 64, "nf4")
    assert torch.equal(packed2, packed) and torch.equal(absmax2, absmax)
    weight = nf4.NF4Weight(packed, q, nf4.code_table("nf4"), nested, code2, off, 64, 37, 96)
    chunks = list(weight.row_chunks())
    assert len(chunks) > 3 and all(r0 * 96 % 64 == 0 for r0, _ in chunks)
    assert torch.equal(torch.cat([weight.rows(r0, r1, torch.float32) for r0, r1 in chunks]), whole)


def _bnb_layer(w, b, quant_type="nf4", double_quant=True, blocksize=64):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=b is not None, quant_type=quant_type,
                              compress_statistics=double_quant, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=blocksize, module=layer)
    if b is not None:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_adopt_bnb_layer_without_requantizing(quant_type, double_quant):
    w, b = _weight((48, 128), torch.float32, seed=3), torch.randn(48)
    ref = _bnb_layer(w, b, quant_type, double_quant)
    model = nn.Sequential(ref)
    lora_triton.quantize(model)
    ours = model[0]
    assert isinstance(ours, NF4Linear)
    assert torch.equal(ours.weight, ref.weight.data)
    assert torch.equal(ours.absmax, ref.weight.quant_state.absmax)
    assert torch.equal(ours.dequantize(torch.float32), F.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_state_dict_layout_both_ways():
    # in_features a multiple of 64: bitsandbytes' CPU forward is right there (see _bnb_dequantize)
    w, b = _weight((32, 128), torch.float32, seed=4), torch.randn(32)
    ref = _bnb_layer(w, b)
    ref_sd = ref.state_dict()
    ours = NF4Linear.from_weight(w, b)
    sd = ours.state_dict()
    assert set(sd) == set(ref_sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                      "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    for key in sd:
        assert sd[key].dtype == ref_sd[key].dtype and sd[key].shape == ref_sd[key].shape, key
    # bnb's file loads here with its outputs
    loaded = NF4Linear(128, 32)
    loaded.load_state_dict(ref_sd)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)
    # ours loads into bitsandbytes the way transformers loads a prequantized checkpoint
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(F.dequantize_4bit(param, param.quant_state), ours.dequantize())
    back = bnb.nn.Linear4bit(128, 32, quant_type="nf4", compute_dtype=torch.float32)
    back.weight, back.bias = param, nn.Parameter(sd["bias"], requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


def test_quantize_model_round_trips_through_safetensors(tmp_path):
    from models import model_input, run, tiny_gpt2
    from safetensors.torch import load_file, save_file

    model = tiny_gpt2()
    inputs = model_input("gpt2")
    with torch.no_grad():
        full = run(model, inputs)
    lora_triton.quantize(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "NF4Linear" in kinds and "Conv1D" not in kinds and isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        quantized = run(model, inputs)
    assert (quantized - full).abs().max() < 0.2 * full.abs().max()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "m.safetensors"))
    fresh = lora_triton.quantize(tiny_gpt2(seed=5))
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), quantized)


def test_quant_buffers_survive_half_and_bad_loads_leave_layer_unchanged():
    layer = NF4Linear.from_weight(_weight((16, 64), torch.float32), torch.randn(16))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    assert layer.compute_dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.nested_absmax, before["weight.nested_absmax"])
    assert layer(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16
    layer.float()
    bad = dict(before)
    bad["weight.absmax"] = bad["weight.absmax"][:-1]
    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="weight.absmax must hold"):
        layer.load_state_dict(bad)
    assert all(torch.equal(v, snapshot[k]) for k, v in layer.state_dict().items())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="quant_type"):
        lora_triton.quantize(nn.Sequential(nn.Linear(4, 4)), quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        lora_triton.quantize(nn.Sequential(nn.Linear(4, 4)), blocksize=48)
    with pytest.raises(ValueError, match="matched no"):
        lora_triton.quantize(nn.Sequential(nn.Linear(4, 4)), target_modules=["nope"])
    layer = NF4Linear.from_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(2, 15))


def test_memory_per_parameter():
    plain = NF4Linear.from_weight(torch.randn(256, 1024), double_quant=False)
    nested = NF4Linear.from_weight(torch.randn(256, 1024), double_quant=True)
    n = 256 * 1024
    assert plain.weight_bytes() / n == pytest.approx(0.5625)
    assert nested.weight_bytes() / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_gemm_twins_reuse_one_scratch_and_match_the_whole_weight(monkeypatch, dtype):
    w = _weight((37, 96), torch.float32, seed=3)
    packed, absmax = nf4.quantize_4bit(w, 64, "nf4")
    q, nested, code2, off = nf4.double_quantize(absmax)
    weight = nf4.NF4Weight(packed, q, nf4.code_table("nf4"), nested, code2, off, 64, 37, 96)
    whole = weight.rows(0, 37, torch.float64)
    g = torch.Generator().manual_seed(4)
    x, dy, bias = torch.randn(5, 96, generator=g), torch.randn(5, 37, generator=g), torch.randn(37, generator=g)
    u, lb, du, la = (torch.randn(*s, generator=g) for s in ((5, 3), (37, 3), (5, 3), (3, 96)))
    y64 = x.double() @ whole.t() + bias.double() + 0.5 * u.double() @ lb.double().t()
    dx64 = dy.double() @ whole + du.double() @ la.double()
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 400)  # several chunks of whole blocks
    assert len(list(weight.row_chunks())) > 3
    nf4._SCRATCH.buffers.clear()
    cast = [t.to(dtype) for t in (x, dy, bias, u, lb, du, la)]
    y = nf4.nf4_linear_fwd(cast[0], weight, cast[2], cast[3], cast[4], 0.5)
    dx = nf4.nf4_linear_dgrad(cast[1], weight, cast[5], cast[6])
    dx_base = nf4.nf4_linear_dgrad(cast[1], weight, None, None)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(dx.double(), dx64, **tol)
    torch.testing.assert_close(dx_base.double(), dy.double() @ whole, **tol)
    (index, pairs), = nf4._SCRATCH.buffers.values()  # one buffer pair, no larger than one chunk
    assert pairs.numel() * 2 <= 400 and index.numel() == pairs.numel()
    # A scratch-backed chunk equals the fresh dequantization bit for bit, and rows() never hands out scratch.
    a = weight.rows(0, 4, torch.float32)
    assert torch.equal(weight.rows(0, 4, torch.float32, scratch=True), a)
    assert a.untyped_storage().data_ptr() != pairs.untyped_storage().data_ptr()
