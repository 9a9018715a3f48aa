"""LoraLinear's one-adapter forward (``_one_adapter_forward``: submodules and parameters read from their dicts)
against the general adapter loop it shortcuts: same outputs and gradients, bit for bit, in every case it
takes, and the general loop for every case it leaves."""

import pytest
import torch
from torch.nn.utils import parametrize

from lora_triton.nn.lora_linear import LoraLinear


def _conv1d(k, n):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n, k)


def _layer(kind, lora_bias=False, p=0.2):
    torch.manual_seed(0)
    base = _conv1d(12, 10) if kind == "conv1d" else torch.nn.Linear(12, 10, bias=kind != "nobias")
    layer = LoraLinear(base, r=3, lora_alpha=6, lora_dropout=p, lora_bias=lora_bias)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_()
    layer.base_layer.requires_grad_(False)
    return layer


def _run(layer, x, seed=7):
    torch.manual_seed(seed)
    y = layer(x)
    params = [x] + [q for q in layer.parameters() if q.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, params, torch.ones_like(y), allow_unused=True)]


def _both(layer, x, monkeypatch):
    calls = []
    real = LoraLinear._one_adapter_forward

    def spy(self, x):
        y = real(self, x)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(LoraLinear, "_one_adapter_forward", spy)
    fast = _run(layer, x)
    monkeypatch.setattr(LoraLinear, "_one_adapter_forward", lambda self, x: None)  # the general loop
    slow = _run(layer, x)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(fast, slow))
    return calls


@pytest.mark.parametrize("kind", ["linear", "nobias", "conv1d"])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_fast_forward_equals_the_adapter_loop(kind, lora_bias, train, monkeypatch):
    layer = _layer(kind, lora_bias).train(train)
    x = torch.randn(2, 5, 12, requires_grad=True)
    assert _both(layer, x, monkeypatch) == [True]


def test_parametrized_base_weight_is_read_through_its_property(monkeypatch):
    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer = _layer("linear")
    parametrize.register_parametrization(layer.base_layer, "weight", Doubled())
    x = torch.randn(4, 12, requires_grad=True)
    assert _both(layer, x, monkeypatch) == [True]
    plain = _layer("linear")
    with torch.no_grad():
        plain.base_layer.weight.mul_(2)
    assert torch.equal(_run(layer, x)[0], _run(plain, x)[0])


def test_other_cases_take_the_adapter_loop(monkeypatch):
    layer = _layer("linear")
    layer.add_adapter("other", r=2, lora_alpha=2)
    layer.active_adapters = ["default", "other"]  # two adapters: the loop sums them
    x = torch.randn(3, 12, requires_grad=True)
    assert _both(layer, x, monkeypatch) == [False]
    layer.active_adapters = ["missing"]  # not an adapter of this layer: the base alone
    assert _both(layer, x, monkeypatch) == [False]
    layer.active_adapters = ["default"]
    layer.merge()
    assert _both(layer, x, monkeypatch) == [False]


def test_dora_disabled_and_autocast_take_the_adapter_loop(monkeypatch):
    x = torch.randn(3, 12, requires_grad=True)
    torch.manual_seed(0)
    dora = LoraLinear(torch.nn.Linear(12, 10), r=3, lora_alpha=6, lora_dropout=0.2, use_dora=True)
    assert _both(dora, x, monkeypatch) == [False]  # a variant: its own forward
    layer = _layer("linear")
    layer.disable_adapters = True  # the base alone
    assert _both(layer, x, monkeypatch) == [False]
    layer.disable_adapters = False
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop casts x, weight and bias
        assert _both(layer, x, monkeypatch) == [False]


def test_general_loop_refuses_the_dtype_mismatch_with_the_same_error(monkeypatch):
    layer = _layer("linear")
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match="does not match the base layer's weight dtype") as fast:
        layer(x)
    monkeypatch.setattr(LoraLinear, "_one_adapter_forward", lambda self, x: None)
    with pytest.raises(TypeError) as slow:
        layer(x)
    assert str(fast.value) == str(slow.value)
