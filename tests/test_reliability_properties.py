"""Issue 8, property-based: random mutations of a valid adapter directory either load as what the
files say, or fail with a clear error and leave the model bit-identical.

Bounded (small max_examples, no deadline) so the default test run stays fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from models import model_input, randomize_lora, run, tiny_mlp
from reliability_common import assert_same, fingerprint
from safetensors.torch import load_file, save_file

import lora_triton
from lora_triton import LoraConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CLEAR_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)
FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
          "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
          "modules_to_save", "lora_bias", "init_lora_weights", "peft_type", "use_dora"]
KEYS = [f"base_model.model.layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1) for m in ("up", "down") for ab in "AB"]

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([0.5, 1e30, float("nan"), float("inf"), -2.0]),
    st.sampled_from(["", "up", "none", "all", "(", ".*", "layers", "0.1", "head", "lora_only", "gaussian"]),
    st.lists(st.sampled_from(["up", "down", "inp", "head", "layers", "x("]), max_size=3),
    st.dictionaries(st.sampled_from(["up", "down", "layers.0.up", "["]),
                    st.one_of(st.integers(-1, 6), st.text(max_size=2)), max_size=2))

_mutation = st.one_of(
    st.tuples(st.just("config_set"), st.sampled_from(FIELDS), _values),
    st.tuples(st.just("config_drop"), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("tensor_shape"), st.sampled_from(KEYS), st.tuples(st.integers(0, 5), st.integers(0, 50))),
    st.tuples(st.just("tensor_dtype"), st.sampled_from(KEYS),
              st.sampled_from([torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.bool])),
    st.tuples(st.just("tensor_drop"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("tensor_add"), st.sampled_from(["base_model.model.inp.bias", "base_model.model.head.weight",
                                                      "base_model.model.layers.0.up.weight", "base_model.model.zz",
                                                      "layers.0.up.lora_A.weight",
                                                      "base_model.model.layers.0.up.base_layer.bias"]),
              st.sampled_from([(32,), (48,), (10, 32), (3,)])),
    st.tuples(st.just("truncate"), st.sampled_from([WEIGHTS, CONFIG]), st.floats(0.0, 0.99)),
    st.tuples(st.just("delete"), st.sampled_from([WEIGHTS, CONFIG]), st.none()),
)


def _mutate(directory: str, mutation) -> None:
    kind, what, arg = mutation
    target = os.path.join(directory, CONFIG if kind.startswith("config") else WEIGHTS if kind.startswith("tensor")
                          else what)
    if not os.path.isfile(target):
        return  # an earlier mutation deleted it
    try:
        if kind.startswith("config"):
            json.loads(open(target).read())
        elif kind.startswith("tensor"):
            load_file(target)
    except Exception:
        return  # an earlier mutation truncated it
    if kind.startswith("config"):
        path = os.path.join(directory, CONFIG)
        data = json.loads(open(path).read())
        if kind == "config_set":
            data[what] = arg
        else:
            data.pop(what, None)
        open(path, "w").write(json.dumps(data))
    elif kind.startswith("tensor"):
        path = os.path.join(directory, WEIGHTS)
        tensors = load_file(path)
        if kind == "tensor_shape" and what in tensors:
            tensors[what] = torch.randn(*arg)
        elif kind == "tensor_dtype" and what in tensors:
            tensors[what] = tensors[what].to(arg)
        elif kind == "tensor_drop":
            tensors.pop(what, None)
        elif kind == "tensor_add":
            tensors[what] = torch.randn(*arg)
        save_file(tensors, path)
    elif kind == "truncate":
        path = os.path.join(directory, what)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(len(data) * arg)])
    else:
        os.remove(os.path.join(directory, what))


def _expected(directory: str, inputs: dict) -> torch.Tensor:
    """What the files say, computed without the loader: each targeted weight + s * B A, in fp64."""
    config = LoraConfig.from_pretrained(directory)
    tensors = load_file(os.path.join(directory, WEIGHTS))
    model = tiny_mlp().double()
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            rest = key[len("base_model.model."):]
            if rest.endswith(".lora_A.weight"):
                path = rest[: -len(".lora_A.weight")]
                b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
                state[f"{path}.weight"] += config.scaling_for(path) * (b @ value.double())
            elif not rest.endswith(".lora_B.weight"):
                state[rest.replace(".base_layer.", ".")].copy_(value)
        return run(model, {k: v.double() for k, v in inputs.items()})


# No shrink phase: a failure reports its example at once instead of minutes of shrinking.
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate], report_multiple_bugs=True)
@given(mutations=st.lists(_mutation, min_size=1, max_size=2), existing=st.booleans())
def test_mutated_adapter_loads_as_the_files_say_or_fails_cleanly(mutations, existing):
    with tempfile.TemporaryDirectory() as tmp:
        source = lora_triton.inject_lora(tiny_mlp(), LoraConfig(target_modules=["up", "down"], r=4, lora_alpha=6))
        randomize_lora(source)
        directory = os.path.join(tmp, "adapter")
        lora_triton.save_adapter(source, directory)
        for mutation in mutations:
            _mutate(directory, mutation)
        model = tiny_mlp()
        if existing:  # rollback must also restore layers that were wrapped before the load
            lora_triton.inject_lora(model, LoraConfig(target_modules=["up", "inp"], r=2), "other")
        before = fingerprint(model)
        inputs = model_input("mlp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                lora_triton.load_adapter(model, directory)
            except CLEAR_ERRORS as exc:
                assert str(exc), "an error without a message"
                assert_same(before, fingerprint(model))
                return
            lora_triton.set_adapter(model, "default")
            with torch.no_grad():
                got = run(model, inputs)
            if not existing:
                want = _expected(directory, inputs)
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mutation", [("config_set", "lora_alpha", 12), ("tensor_dtype", KEYS[0], torch.float16)])
def test_valid_mutations_load_as_the_files_say(mutation):
    # The two outcomes above both occur: these mutations keep the adapter valid.
    with tempfile.TemporaryDirectory() as tmp:
        source = lora_triton.inject_lora(tiny_mlp(), LoraConfig(target_modules=["up", "down"], r=4))
        randomize_lora(source)
        directory = os.path.join(tmp, "adapter")
        lora_triton.save_adapter(source, directory)
        _mutate(directory, mutation)
        model = lora_triton.load_adapter(tiny_mlp(), directory)
        inputs = model_input("mlp")
        with torch.no_grad():
            torch.testing.assert_close(run(model, inputs).double(), _expected(directory, inputs), rtol=1e-4,
                                       atol=1e-4)
