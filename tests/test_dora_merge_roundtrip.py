"""DoRA merge / unmerge round trips on Linear (nn.Linear, GPT-2 Conv1D), Embedding and Conv1d/2d, one DoRA
implementation for all (``DoraVariant.merge_weight`` / ``unmerge_weight`` / ``weight_change``):

* a single DoRA merge writes exactly g (W + s B A) rounded once to the base dtype (g = m / n, n the forward's
  norm): the formula pinned bit for bit, so a refactor cannot change a merged weight silently;
* stacked merges (LoRA then DoRA, DoRA then LoRA, two DoRAs), together or one at a time, equal an fp64
  evaluation and the unmerged forward; unmerge restores the base;
* the weighted-merging view's delta (``nn/merge_views.py``) is the change of the adapter's eval forward,
  merged or not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_triton
from lora_triton.nn.merge_views import view_of

PATHS = ("lin", "gpt", "emb", "c1", "c2")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 7)
        self.gpt = Conv1D(7, 12)  # [in, out] storage: fan_in_fan_out
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, (3, 2), padding=1, bias=False)


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notes for Conv1D
        yield


CONFIGS = {"d": dict(r=2, lora_alpha=5, use_dora=True), "e": dict(r=3, lora_alpha=2, use_dora=True),
           "a": dict(r=3, lora_alpha=4)}


def _net(dtype, names) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype).eval()
    for name in names:
        cfg = lora_triton.LoraConfig(target_modules=list(PATHS), init_lora_weights=False, **CONFIGS[name])
        lora_triton.inject_lora(net, cfg, adapter_name=name)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.linspace(0.8, 1.3, p.numel()).view(p.shape).to(dtype))  # m != n
    return net


def _input(path: str, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if path == "emb":
        return torch.randint(0, 20, (2, 5), generator=g)
    shape = {"lin": (3, 12), "gpt": (3, 12), "c1": (2, 8, 5), "c2": (2, 6, 4, 3)}[path]
    return torch.randn(shape, generator=g).to(dtype)


def _factors64(layer, name):
    """A [r, in], B [out, r] (flattened) in fp64, and the scaling."""
    if hasattr(layer, "lora_embedding_A"):
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return a.detach().double().flatten(1), b.detach().double().flatten(1), layer.scaling[name]


def _as_rows(layer, w: torch.Tensor) -> torch.Tensor:
    """A base weight as [out, in] rows over which DoRA's norm runs."""
    if isinstance(layer.base_layer, nn.Embedding):
        return w.t()
    if isinstance(layer.base_layer, Conv1D):
        return w.t()
    return w.flatten(1)


def _from_rows(layer, rows: torch.Tensor) -> torch.Tensor:
    w = layer.base_layer.weight
    return rows.t() if isinstance(layer.base_layer, (nn.Embedding, Conv1D)) else rows.reshape(w.shape)


def _merged64(layer, names, base64) -> torch.Tensor:
    """PEFT's merge in fp64: in order, DoRA scales W_now + dW by m / ||W_base_unmerged + dW||."""
    w, base = _as_rows(layer, base64), _as_rows(layer, base64)
    for n in names:
        a, b, s = _factors64(layer, n)
        delta = s * b @ a
        if n in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector[n].weight.detach().double().reshape(-1)
            w = (m / (base + delta).norm(dim=1))[:, None] * (w + delta)
        else:
            w = w + delta
    return _from_rows(layer, w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_dora_merge_is_the_pinned_formula_bit_for_bit(path, dtype):
    net = _net(dtype, ["d"])
    layer = net.get_submodule(path)
    variant = layer.lora_variant["d"]
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        norm = variant.weight_norm(layer, "d").clone()
        m = layer.lora_magnitude_vector["d"].weight.detach().reshape(-1).float()
        a, b, s = _factors64(layer, "d")
        delta = (b.float() @ a.float()) * s  # [out, in] rows
        rows = _as_rows(layer, w0.float())
        if isinstance(layer.base_layer, (nn.Conv1d, nn.Conv2d)):  # a conv merges its einsum delta, same sums
            delta = layer.delta_weight("d").flatten(1)
        want = _from_rows(layer, (m / norm)[:, None] * (rows + delta)).to(dtype)
    layer.merge(["d"])
    assert torch.equal(layer.base_layer.weight, want), path
    layer.unmerge()
    step = torch.finfo(dtype).eps * (1 + w0.abs().max().item())
    assert (layer.base_layer.weight.float() - w0.float()).abs().max().item() <= 2 * step, path


@pytest.mark.parametrize("names", [["d"], ["a", "d"], ["d", "a"], ["d", "e"]], ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_round_trip_every_layer_type(names, dtype):
    net = _net(dtype, list(dict.fromkeys(names)))
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # DoRA's norm is fp32 even on an fp64 layer
    for path in PATHS:
        layer = net.get_submodule(path)
        layer.active_adapters = list(names)
        x = _input(path, dtype)
        w0 = layer.base_layer.weight.detach().clone()
        with torch.no_grad():
            y0 = layer(x)
            want = _merged64(layer, names, w0.double())
            layer.merge(names)
            merged = layer.base_layer.weight.detach()
            scale = 1 + want.abs().max().item()
            assert (merged.double() - want).abs().max().item() <= tol * scale, path
            assert (layer(x) - y0).abs().max().item() <= tol * (1 + y0.abs().max().item()), path
            layer.unmerge()
            assert (layer.base_layer.weight.double() - w0.double()).abs().max().item() <= tol * scale, path
            assert (layer(x) - y0).abs().max().item() <= tol * (1 + y0.abs().max().item()), path
            for n in names:  # one at a time: the same merge (up to the roundings of the base in between)
                layer.merge([n])
            assert (layer.base_layer.weight.double() - want).abs().max().item() <= tol * scale, path
            layer.unmerge()


@pytest.mark.parametrize("merged", [False, True])
def test_merge_view_delta_is_the_eval_forward_change(merged):
    net = _net(torch.float64, ["a", "d"])
    for path in PATHS:
        layer = net.get_submodule(path)
        view = view_of(layer)
        x = _input(path, torch.float64)
        with torch.no_grad():
            layer.active_adapters = ["a"]
            if merged:
                layer.merge(["a"])  # the view takes W with earlier merges out: W + dW_a is not DoRA's base
            delta = view.stored_delta("d", torch.float64)
            want = _merged64(layer, ["d"], _base64(layer, merged)) - _base64(layer, merged)
            assert (delta - want).abs().max().item() <= 1e-6 * (1 + want.abs().max().item()), path
            if not merged:
                layer.active_adapters = ["d"]
                y = layer(x)
                with_delta = _apply(layer, x, layer.base_layer.weight.detach() + delta)
                assert (with_delta - y).abs().max().item() <= 1e-6 * (1 + y.abs().max().item()), path
            else:
                layer.unmerge()


def _base64(layer, merged: bool) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    if not merged:
        return w
    a, b, s = _factors64(layer, "a")
    return _from_rows(layer, _as_rows(layer, w) - s * b @ a)


def _apply(layer, x, weight) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return nn.functional.embedding(x, weight, base.padding_idx)
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)
