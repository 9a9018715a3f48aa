"""Bad inputs give clear errors, and a failed load or save leaves everything as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import TinyMLP, model_input, randomize_lora, run, tiny_mlp
from safetensors.torch import load_file, save_file

import lora_triton
import lora_triton.io.peft_format as peft_format
from lora_triton.nn import LoraLinear, lora_layers

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    """An MLP adapter (r=4 on up/down, lora_bias) saved by lora_triton, and the directory."""
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["up", "down"], r=4))
    randomize_lora(model)
    directory = tmp_path / "adapter"
    lora_triton.save_adapter(model, str(directory))
    return model, directory


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    assert not lora_layers(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(snap)
    for k, v in state.items():
        assert torch.equal(v, snap[k]), k
    assert not lora_triton.nn.adapter_configs(model)


def _load_fails(model, directory, match, exc=ValueError):
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        lora_triton.load_adapter(model, str(directory))
    _assert_untouched(model, snap)


def _edit_weights(directory, fn):
    path = directory / WEIGHTS
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- injection / adapter names -------------------------------------------------------------------
def test_zero_targets_lists_module_names():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"matched no module.*'inp'.*'layers\.0\.up'"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["q_proj"]))
    _assert_untouched(model, _snapshot(tiny_mlp()))


def test_target_of_unsupported_type():
    with pytest.raises(TypeError, match="'norm' is a LayerNorm"):
        lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["norm"]))


def test_unknown_adapter_in_set_adapter():
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["up"]), "a")
    with pytest.raises(KeyError, match=r"unknown adapter 'zz'.*\['a'\]"):
        lora_triton.set_adapter(model, ["a", "zz"])
    assert lora_triton.active_adapters(model) == ["a"]
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        lora_triton.delete_adapter(model, "zz")
    with pytest.raises(ValueError, match="already exists"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"]), "a")
    with pytest.raises(ValueError, match="adapter_name"):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=["up"]), "a.b")


def test_input_dtype_mismatch_in_module():
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["inp"]))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(2, 16, dtype=torch.float64))


def test_lora_linear_wraps_only_linear():
    with pytest.raises(TypeError, match="Conv2d"):
        LoraLinear(torch.nn.Conv2d(3, 3, 1))


# -- load failures: the model is left as it was -------------------------------------------------
def test_load_into_model_missing_target(saved):
    _, directory = saved
    model = tiny_mlp()
    model.layers = torch.nn.Sequential(model.layers[0])  # no layers.1
    _load_fails(model, directory, r"the model has no module 'layers\.1\.(up|down)'")


def test_load_shape_mismatch(saved):
    _, directory = saved
    torch.manual_seed(0)
    model = TinyMLP(hidden=40)
    _load_fails(model, directory, r"shape \(4, 48\) in the file, expected \(4, 40\)")


def test_load_rank_disagrees_with_config(saved):
    _, directory = saved
    _edit_config(directory, r=3)
    _load_fails(tiny_mlp(), directory, r"rank disagrees")


def test_load_rank_pattern_disagrees(saved):
    _, directory = saved
    _edit_config(directory, rank_pattern={"down": 2})
    _load_fails(tiny_mlp(), directory, r"layers\.0\.down\.lora_A\.weight: shape \(4, 48\).*\(2, 48\).*rank")


def test_load_missing_key(saved):
    _, directory = saved
    _edit_weights(directory, lambda t: t.pop("base_model.model.layers.1.down.lora_B.weight"))
    _load_fails(tiny_mlp(), directory, r"missing key base_model\.model\.layers\.1\.down\.lora_B\.weight")


def test_load_missing_module(saved):
    _, directory = saved

    def drop(t):
        for k in [k for k in t if ".layers.1.up." in k]:
            del t[k]

    _edit_weights(directory, drop)
    _load_fails(tiny_mlp(), directory, r"missing adapter weights for targeted modules \['layers\.1\.up'\]")


@pytest.mark.parametrize("key, match", [
    ("base_model.model.layers.0.nothing.weight", r"unexpected key base_model\.model\.layers\.0\.nothing\.weight"),
    ("model.layers.0.up.lora_A.weight", r"unexpected key 'model\.layers\.0\.up\.lora_A\.weight'"),
    ("base_model.model.inp.lora_A.weight", r"the config does not target module 'inp'"),
])
def test_load_unexpected_key(saved, key, match):
    _, directory = saved
    _edit_weights(directory, lambda t: t.__setitem__(key, torch.zeros(4, 16)))
    _load_fails(tiny_mlp(), directory, match)


def test_load_plain_key_shape_mismatch(saved):
    _, directory = saved
    _edit_weights(directory, lambda t: t.__setitem__("base_model.model.inp.bias", torch.zeros(5)))
    _load_fails(tiny_mlp(), directory, r"inp\.bias: shape \(5,\) in the file, model has \(32,\)")


def test_load_lora_bias_disagrees(saved):
    _, directory = saved
    _edit_config(directory, lora_bias=True)
    _load_fails(tiny_mlp(), directory, r"lora_B\.bias presence disagrees with lora_bias=True")


def test_load_corrupt_safetensors(saved):
    _, directory = saved
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])
    _load_fails(tiny_mlp(), directory, "not a readable safetensors file")
    (directory / WEIGHTS).write_bytes(b"\x00" * 3)
    _load_fails(tiny_mlp(), directory, "not a readable safetensors file")


def test_load_pickle_only_dir(saved):
    model, directory = saved
    os.remove(directory / WEIGHTS)
    torch.save({"x": torch.zeros(1)}, directory / "adapter_model.bin")
    _load_fails(tiny_mlp(), directory, r"adapter_model\.bin \(pickle\).*safetensors only")


def test_load_no_weights_no_config(saved, tmp_path):
    _, directory = saved
    os.remove(directory / WEIGHTS)
    _load_fails(tiny_mlp(), directory, r"no adapter_model\.safetensors", FileNotFoundError)
    _load_fails(tiny_mlp(), tmp_path / "empty", r"no adapter_config\.json", FileNotFoundError)


def test_load_bad_json(saved):
    _, directory = saved
    (directory / "adapter_config.json").write_text("{not json")
    _load_fails(tiny_mlp(), directory, "not valid JSON")


def test_load_twice_same_name_leaves_model(saved):
    _, directory = saved
    model = lora_triton.load_adapter(tiny_mlp(), str(directory))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        lora_triton.load_adapter(model, str(directory))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# -- atomic save ----------------------------------------------------------------------------------
def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch):
    model, directory = saved
    inputs = model_input("mlp")
    with torch.no_grad():
        expected = run(model, inputs)
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    randomize_lora(model, seed=99)  # new values that must not reach disk

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(peft_format, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        lora_triton.save_adapter(model, str(directory))
    after = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    assert after == before  # same files, same bytes, no temporary file left behind
    loaded = lora_triton.load_adapter(tiny_mlp(), str(directory))
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=0)


def test_interrupted_config_write_keeps_previous(saved, monkeypatch):
    model, directory = saved
    before = (directory / "adapter_config.json").read_bytes()
    import lora_triton.io.atomic as atomic

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        lora_triton.LoraConfig(r=2, target_modules=["up"]).save_pretrained(str(directory))
    assert (directory / "adapter_config.json").read_bytes() == before
    assert sorted(os.listdir(directory)) == ["adapter_config.json", WEIGHTS]


# -- the op ---------------------------------------------------------------------------------------
def _operands(m=4, k=8, n=6, r=2, dtype=torch.float32):
    return (torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype),
            torch.randn(r, k, dtype=dtype), torch.randn(n, r, dtype=dtype))


@pytest.mark.parametrize("change, exc, match", [
    (dict(a=torch.randn(2, 7)), ValueError, r"lora_A must be \[r, in_features=8\], got \(2, 7\)"),
    (dict(a=torch.randn(2, 8, 1)), ValueError, r"lora_A must be"),
    (dict(b=torch.randn(6, 3)), ValueError, r"lora_B must be \[out_features, r=2\], got \(6, 3\)"),
    (dict(w=torch.randn(5, 8)), ValueError, r"weight must be \[out_features=6, in_features=8\], got \(5, 8\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must be \[out_features=6\]"),
    (dict(x=torch.tensor(1.0)), ValueError, "scalar"),
    (dict(w=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"weight dtype torch\.float64"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, r"bias dtype torch\.float16"),
    (dict(x=torch.randint(0, 3, (4, 8)), w=None, bias=None), TypeError, "floating point"),
    (dict(a=torch.randn(2, 8, device="meta")), ValueError, r"one device.*lora_A on meta"),
    (dict(p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1\.0"),
    (dict(p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    (dict(p=0.1, seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (dict(p=0.1, seed=torch.tensor([1.5])), ValueError, r"seed tensor must hold one int64.*float32"),
    (dict(p=0.1, seed=torch.tensor([1, 2])), ValueError, r"seed tensor must hold one int64.*\(2,\)"),
])
def test_lora_linear_bad_operands(change, exc, match):
    x, w, bias, a, b = _operands()
    args = dict(x=x, w=w, bias=bias, a=a, b=b, p=0.0, seed=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        lora_triton.lora_linear(args["x"], args["w"], args["bias"], args["a"], args["b"], 1.0, args["p"],
                                seed=args["seed"])
