"""Training: loss and LoRA gradients equal PEFT's (dropout 0); with dropout, an explicit-mask reference."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from models import BUILDERS, model_input, randomize_lora, run

import lora_triton
from lora_triton.nn import LoraLinear
from lora_triton.reference.philox import dropout_keep_mask

PREFIX = "base_model.model."

CASES = {
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=4, lora_alpha=8,
                  rank_pattern={"k_proj": 2}, use_rslora=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], r=3, lora_alpha=6, bias="lora_only", lora_bias=True),
    "mlp": dict(target_modules=["up", "down", "inp"], r=4, lora_alpha=16, bias="all", modules_to_save=["head"]),
}


def _loss(kind, model, inputs):
    out = run(model, inputs)
    if kind == "mlp":
        return (out**2).mean()
    logits = out[:, :-1].reshape(-1, out.shape[-1])
    return F.cross_entropy(logits, inputs["input_ids"][:, 1:].reshape(-1))


def _pair(kind):
    """Our model and PEFT's, with identical (random, non-zero) trainable parameters."""
    kwargs = CASES[kind]
    ours = lora_triton.inject_lora(BUILDERS[kind](), lora_triton.LoraConfig(**kwargs)).train()
    randomize_lora(ours, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(fan_in_fan_out=kind == "gpt2", **kwargs)
        theirs = peft.get_peft_model(BUILDERS[kind](), cfg).train()
    theirs_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, p in ours.state_dict(keep_vars=True).items():
            theirs_params.get(PREFIX + name, theirs.state_dict(keep_vars=True)[PREFIX + name]).copy_(p)
    return ours, theirs


def _trainable(model, prefix=""):
    return {n.removeprefix(prefix): p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_loss_and_grads_match_peft(kind):
    ours, theirs = _pair(kind)
    mine, peft_params = _trainable(ours), _trainable(theirs, PREFIX)
    assert sorted(mine) == sorted(peft_params)
    assert any(".lora_A." in n for n in mine)
    inputs = model_input(kind)
    opt_ours = torch.optim.AdamW(mine.values(), lr=1e-2)
    opt_theirs = torch.optim.AdamW([peft_params[n] for n in mine], lr=1e-2)
    for step in range(2):
        loss_ours, loss_theirs = _loss(kind, ours, inputs), _loss(kind, theirs, inputs)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
        if step == 1:
            break
        loss_ours.backward()
        loss_theirs.backward()
        for name, p in mine.items():
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, peft_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        opt_ours.step()
        opt_theirs.step()


# -- dropout: explicit-mask reference -------------------------------------------------------------
def _explicit(x, w, b, a, bb, s, p, seed):
    k = x.shape[-1]
    keep = dropout_keep_mask(seed, x.numel() // k, k, p).reshape(x.shape)
    xd = x * keep / (1 - p)
    y = xd @ a.t() @ bb.t() * s
    if w is not None:
        y = y + x @ w.t()
    if b is not None:
        y = y + b
    return y


def _leaves(*shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("p, seed", [(0.1, 1234), (0.5, 2**40 + 3), (0.3, 0)])
@pytest.mark.parametrize("lead", [(9,), (2, 3, 5)])
def test_dropout_grads_match_explicit_mask(p, seed, lead):
    k, n, r, s = 24, 20, 3, 1.7
    x, w, b, a, bb = _leaves((*lead, k), (n, k), (n,), (r, k), (n, r), seed=seed % 97, dtype=torch.float32)
    y = lora_triton.lora_linear(x, w, b, a, bb, s, p, seed=seed)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    xr, wr, br, ar, br2 = (t.detach().clone().requires_grad_() for t in (x, w, b, a, bb))
    yr = _explicit(xr, wr, br, ar, br2, s, p, seed)
    ref = torch.autograd.grad(yr, (xr, wr, br, ar, br2), dy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB"), grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    # The mask matters: another seed gives other gradients.
    y2 = lora_triton.lora_linear(x, w, b, a, bb, s, p, seed=seed + 1)
    assert not torch.allclose(y, y2)


def test_dropout_seed_tensor_equals_int():
    x, a, bb = _leaves((6, 10), (2, 10), (5, 2), dtype=torch.float32)
    y1 = lora_triton.lora_linear(x, None, None, a, bb, 2.0, 0.25, seed=77)
    y2 = lora_triton.lora_linear(x, None, None, a, bb, 2.0, 0.25, seed=torch.tensor([77]))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def _layer(p=0.2, conv1d=False):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(12, 16)
    else:
        base = torch.nn.Linear(16, 12)
    layer = LoraLinear(base, "default", r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False)
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_linear_module_train_mode_dropout(conv1d):
    layer = _layer(conv1d=conv1d).train()
    x = torch.randn(3, 5, 16)
    torch.manual_seed(42)
    y1 = layer(x)
    torch.manual_seed(42)
    y2 = layer(x)
    torch.manual_seed(43)
    y3 = layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)
    # The module draws its seed from torch's generator: rebuild that draw and check the explicit mask.
    torch.manual_seed(42)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    w, b = layer.base_weight(), layer.base_bias()
    ref = _explicit(x, w, b, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                    layer.scaling["default"], 0.2, seed)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
    # Gradients of the module equal those of the explicit reference under the same mask.
    torch.manual_seed(42)
    dy = torch.randn_like(y1)
    torch.manual_seed(42)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    got = torch.autograd.grad(layer(x), params, dy)
    want = torch.autograd.grad(ref, params, dy)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)
    # Eval mode: no dropout, deterministic, equal to p = 0.
    layer.eval()
    ref0 = _explicit(x, w, b, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                     layer.scaling["default"], 0.0, 0)
    torch.testing.assert_close(layer(x), ref0, rtol=1e-5, atol=1e-5)


def test_eval_with_dropout_config_matches_peft():
    """lora_dropout > 0 in the config: in eval mode both are deterministic and equal."""
    kwargs = dict(target_modules=["up", "down"], r=4, lora_dropout=0.3)
    ours = lora_triton.inject_lora(BUILDERS["mlp"](), lora_triton.LoraConfig(**kwargs)).eval()
    randomize_lora(ours, seed=1)
    theirs = peft.get_peft_model(BUILDERS["mlp"](), peft.LoraConfig(**kwargs)).eval()
    randomize_lora(theirs, seed=1)
    inputs = model_input("mlp")
    with torch.no_grad():
        torch.testing.assert_close(run(ours, inputs), run(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_dropout_changes_training_output_only():
    kwargs = dict(target_modules=["up", "down"], r=4, lora_dropout=0.5)
    model = lora_triton.inject_lora(BUILDERS["mlp"](), lora_triton.LoraConfig(**kwargs))
    randomize_lora(model, seed=1)
    inputs = model_input("mlp")
    model.eval()
    e1, e2 = run(model, inputs), run(model, inputs)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    model.train()
    t1, t2 = run(model, inputs), run(model, inputs)
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)


def test_autocast_bf16_on_fp32_model():
    kwargs = dict(target_modules=["up", "down", "inp"], r=4, lora_bias=True)
    model = lora_triton.inject_lora(BUILDERS["mlp"](), lora_triton.LoraConfig(**kwargs)).train()
    randomize_lora(model, seed=2)
    x = model_input("mlp")["x"]
    y32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model(x)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max().item() <= 3e-2 * (y32.abs().max().item() + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    g32 = torch.autograd.grad(y32.square().mean(), params)
    g16 = torch.autograd.grad(y16.float().square().mean(), params)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32
        assert (a - b).abs().max().item() <= 5e-2 * (b.abs().max().item() + 1e-3)
