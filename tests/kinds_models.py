"""Tiny conv / embedding models and a PEFT-both-ways check shared by the adapter-kind tests."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import lora_triton as lt


class ConvNet(nn.Module):
    """Embedding -> Conv1d (grouped) -> Conv2d (strided) -> Conv3d -> Linear head; every layer type once."""

    def __init__(self, dilation: int = 1, padding_mode: str = "zeros", groups: int = 2):
        super().__init__()
        self.emb = nn.Embedding(23, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 12, 3, padding=1, groups=groups)
        self.c2 = nn.Conv2d(3, 10, 3, stride=2, padding=1 + (dilation - 1), dilation=dilation,
                            padding_mode=padding_mode)
        self.c3 = nn.Conv3d(10, 6, (1, 2, 2), bias=False)
        self.proj = nn.Linear(12, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, ids, img):
        h = self.c1(self.emb(ids).transpose(1, 2)).mean(-1)  # [B, 12]
        g = self.c3(self.c2(img).unsqueeze(2)).mean((2, 3, 4))  # [B, 6]
        return self.head(torch.relu(self.proj(h) + g))


def conv_net(seed: int = 0, **kwargs) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**kwargs).eval()


def conv_inputs(seed: int = 1, batch: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 23, (batch, 9), generator=g), "img": torch.randn(batch, 3, 11, 9, generator=g)}


def call(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else getattr(out, "sample", getattr(out, "logits", out))


def train_steps(model: nn.Module, inputs: dict, steps: int = 2, lr: float = 0.05) -> None:
    """A few SGD steps on the trainable parameters so nothing is left at its initial value."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        call(model, inputs).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    model.eval()


def trained_conv_net(config) -> tuple[nn.Module, dict, torch.Tensor]:
    """``conv_net()`` with ``config`` injected and trained a few steps: (net, inputs, its outputs)."""
    net = conv_net()
    lt.inject_lora(net, config)
    inputs = conv_inputs()
    train_steps(net, inputs)
    return net, inputs, call(net, inputs)


def adapter_grads(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters, named without PEFT's ``base_model.model.`` prefix."""
    model.train()
    model.zero_grad()
    call(model, inputs).pow(2).mean().backward()
    model.eval()
    return {n.removeprefix("base_model.model."): p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def peft_both_ways(build, inputs: dict, peft_config, tmp_path, tol: float = 1e-5, lr: float = 0.3,
                   wrong_peft_grads: tuple = ()) -> dict:
    """PEFT trains and saves -> lora_triton loads (same outputs and gradients) -> trains, saves -> PEFT loads
    (same outputs). Returns the measured differences. ``wrong_peft_grads``: parameter-name fragments whose
    PEFT gradient is known wrong (checked against finite differences by the caller instead)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft_config)
        train_steps(pm, inputs, lr=lr)
        pm.save_pretrained(str(tmp_path / "peft"))
    ours = lt.load_adapter(build(), str(tmp_path / "peft"), is_trainable=True)
    diffs = {"peft->ours": max_diff(call(ours, inputs), call(pm, inputs))}
    theirs_g, ours_g = adapter_grads(pm, inputs), adapter_grads(ours, inputs)
    assert sorted(theirs_g) == sorted(ours_g), (sorted(theirs_g), sorted(ours_g))
    diffs["grad"] = max(max_diff(ours_g[n], theirs_g[n]) / (1.0 + theirs_g[n].abs().max().item()) for n in ours_g
                        if not any(w in n for w in wrong_peft_grads))
    train_steps(ours, inputs, steps=1, lr=lr)
    lt.save_adapter(ours, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours")).eval()
    diffs["ours->peft"] = max_diff(call(back, inputs), call(ours, inputs))
    moved = max_diff(call(ours, inputs), call(pm, inputs))
    assert moved > 10 * tol, f"our training step changed nothing ({moved}): the comparison would be vacuous"
    for what, d in diffs.items():
        assert d <= tol, (what, d, diffs)
    return diffs
