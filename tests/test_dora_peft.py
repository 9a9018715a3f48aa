"""DoRA against the real PEFT (0.21.2): trained adapters load both ways with the same logits (fp32, 1e-5),
training gradients equal PEFT's (p = 0; p > 0 against PEFT's layer fed an explicit mask), the norm cache."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import BUILDERS, load_here, load_in_peft, max_diff, model_input, run

import lora_triton
from lora_triton.nn import LoraLinear
from lora_triton.ops.dora import dora_linear
from lora_triton.reference.philox import dropout_keep_mask

TOL = 1e-5
PREFIX = "base_model.model."

CASES = {
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8,
                            rank_pattern={"down_proj": 2}, use_rslora=True)),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True, r=3, lora_alpha=6)),
    "mlp": ("mlp", dict(target_modules=["inp", "up", "down"], r=2, lora_alpha=5, bias="lora_only")),
}


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def _loss(model, inputs):
    return run(model, inputs).float().pow(2).mean()


def _train(model, inputs, steps=3, lr=3e-2):
    """A few Adam steps, so B != 0 and the magnitudes move away from ||W + s B A||."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, inputs).backward()
        opt.step()
    return model.eval()


def _peft_trained(kind, kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(use_dora=True, **kwargs))
        _train(pm, model_input(kind, seed=2))
        pm.save_pretrained(str(tmp_path))
    return pm


def _magnitude_moved(named_params) -> float:
    """How far the largest magnitude moved from the norm it started at (non-trivial m)."""
    return max((p - p.detach().mean()).abs().max().item() for n, p in named_params if "magnitude" in n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_dora_loads_here(case, tmp_path):
    kind, kwargs = CASES[case]
    pm = _peft_trained(kind, kwargs, tmp_path)
    inputs = model_input(kind)
    model, expected, got, base = load_here(pm, kind, tmp_path, inputs)
    assert max_diff(got, base) > 1e-3, "the trained adapter should change the logits"
    assert max_diff(got, expected) <= TOL
    theirs = {n.removeprefix(PREFIX): p for n, p in pm.named_parameters() if "lora_magnitude_vector" in n}
    ours = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert sorted(ours) == sorted(theirs) and ours  # PEFT names: <path>.lora_magnitude_vector.default.weight
    for name, p in ours.items():
        layer = model.get_submodule(name.rsplit(".lora_magnitude_vector", 1)[0])
        norm = layer.lora_variant["default"].weight_norm(layer, "default")
        assert (p - norm).abs().max() > 1e-4, "training should move m off ||W + s B A||"
        assert torch.equal(p, theirs[name])


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_trained_dora_loads_in_peft(case, tmp_path):
    kind, kwargs = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}
    model = lora_triton.inject_lora(BUILDERS[kind](), lora_triton.LoraConfig(use_dora=True, **kwargs))
    _train(model, model_input(kind, seed=2))
    lora_triton.save_adapter(model, str(tmp_path))
    inputs = model_input(kind)
    pm, expected, got = load_in_peft(model, kind, tmp_path, inputs)
    assert pm.peft_config["default"].use_dora
    assert max_diff(got, expected) <= TOL
    with torch.no_grad(), lora_triton.disable_adapters(model):
        assert max_diff(run(model, inputs), expected) > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_gradients_equal_peft(case, tmp_path):
    """Same adapter in both, one training step's loss gradients for every A, B and m (p = 0)."""
    kind, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(use_dora=True, init_lora_weights=False,
                                                                   **kwargs))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(n))))
        pm.save_pretrained(str(tmp_path))
    model = lora_triton.load_adapter(BUILDERS[kind](), str(tmp_path), is_trainable=True).train()
    pm.train()
    inputs = model_input(kind)
    _loss(pm, inputs).backward()
    _loss(model, inputs).backward()
    theirs = {n.removeprefix(PREFIX): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    assert any("lora_magnitude_vector" in n for n in ours)
    for name, grad in ours.items():
        scale = theirs[name].abs().max().item()
        assert scale > 0, name
        assert max_diff(grad, theirs[name]) <= 1e-5 * max(1.0, scale), name


class _FixedMask(torch.nn.Module):
    """PEFT's dropout slot, fed the mask our Philox stream draws: PEFT's form with an explicit mask."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape) / (1 - self.p)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dropout_gradients_equal_peft_with_the_same_mask(fan_in_fan_out):
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(0)
    tokens, k, n, r, p, seed = 13, 24, 20, 4, 0.3, 4321
    cfg = peft.LoraConfig(r=r, lora_alpha=8, lora_dropout=p, use_dora=True, init_lora_weights=False,
                          fan_in_fan_out=fan_in_fan_out)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(n, k)
    else:
        base = torch.nn.Linear(k, n)
    base.requires_grad_(False)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=8, lora_dropout=p, use_dora=True,
                       fan_in_fan_out=fan_in_fan_out, init_lora_weights=False).train()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    keep = dropout_keep_mask(seed, tokens, k, p)
    layer.lora_dropout["default"] = _FixedMask(keep, p)
    x = torch.randn(tokens, k, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    dy = torch.randn(tokens, n)
    expected = layer(x)
    g_theirs = torch.autograd.grad(expected, [x, a, b, m], dy)
    w = base.weight.t() if fan_in_fan_out else base.weight
    got = dora_linear(x, w, base.bias, a, b, m, layer.scaling["default"], p, seed)
    g_ours = torch.autograd.grad(got, [x, a, b, m], dy)
    assert max_diff(got, expected) <= TOL
    for ours, theirs in zip(g_ours, g_theirs):
        assert max_diff(ours, theirs) <= TOL * max(1.0, theirs.abs().max().item())


def test_layer_dropout_draws_a_fresh_mask_and_stays_in_peft_form():
    """Training with p > 0 through LoraLinear: two calls give different masks; eval equals PEFT's p = 0 form."""
    torch.manual_seed(1)
    layer = LoraLinear(torch.nn.Linear(16, 12), "default", r=3, lora_alpha=6, lora_dropout=0.5, use_dora=True,
                       init_lora_weights=False).train()
    x = torch.randn(5, 16)
    assert max_diff(layer(x), layer(x)) > 1e-4
    layer.eval()
    w, bias = layer.base_weight(), layer.base_bias()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        g = m / (w + 2.0 * b @ a).norm(dim=1)
        expected = g * (x @ w.t() + 2.0 * (x @ a.t()) @ b.t()) + bias
        assert max_diff(layer(x), expected) <= TOL


def test_norm_cache_is_paid_once_per_optimizer_step_and_invalidated():
    torch.manual_seed(2)
    layer = LoraLinear(torch.nn.Linear(16, 12), "default", r=3, lora_alpha=6, use_dora=True,
                       init_lora_weights=False).train()
    layer.base_layer.requires_grad_(False)
    variant = layer.lora_variant["default"]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 16)
    start = variant.norm_computations
    for _ in range(3):  # gradient accumulation: three micro-steps reuse the norm computed at init
        layer(x).pow(2).sum().backward()
    assert variant.norm_computations == start
    opt.step()  # A and B change in place: their version counters move
    y = layer(x)
    layer(x)
    assert variant.norm_computations == start + 1

    def fresh():
        w, a, b = layer.base_weight(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            return dora_linear(x, w.clone(), layer.base_bias(), a.clone(), b.clone(), m, layer.scaling["default"])

    assert max_diff(y, fresh()) <= TOL
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # a changed frozen weight: ||W||^2 and n are recomputed
    assert max_diff(layer(x), fresh()) <= TOL
    with torch.no_grad():
        layer.lora_B["default"].weight.data = torch.randn(12, 3)  # a replaced tensor, not an in-place write
    assert max_diff(layer(x), fresh()) <= TOL


def test_dora_in_either_position_among_active_adapters():
    torch.manual_seed(3)
    layer = LoraLinear(torch.nn.Linear(8, 6), "plain", r=2, init_lora_weights=False)
    layer.add_adapter("d", 2, 4, use_dora=True, init_lora_weights=False)
    x = torch.randn(3, 8)
    layer.active_adapters = ["plain", "d"]  # PEFT at p = 0: DoRA rescales the sum before it (bias excluded)
    with torch.no_grad():
        w, bias = layer.base_weight(), layer.base_bias()
        a, b = layer.lora_A["plain"].weight, layer.lora_B["plain"].weight
        y = x @ w.t() + bias + layer.scaling["plain"] * (x @ a.t()) @ b.t()
        g = layer.lora_magnitude_vector["d"].weight / layer.lora_variant["d"].weight_norm(layer, "d")
        lora_d = layer.scaling["d"] * (x @ layer.lora_A["d"].weight.t()) @ layer.lora_B["d"].weight.t()
        assert max_diff(layer(x), y + (g - 1) * (y - bias) + g * lora_d) <= TOL
    layer.active_adapters = ["d", "plain"]  # PEFT: DoRA's output, then the plain LoRA term added
    with torch.no_grad():
        only_d = layer.lora_variant["d"].forward(layer, "d", x, layer.base_weight(), layer.base_bias(), 0.0)
        a, b = layer.lora_A["plain"].weight, layer.lora_B["plain"].weight
        plain = layer.scaling["plain"] * (x @ a.t()) @ b.t()
        assert max_diff(layer(x), only_d + plain) <= TOL
    layer.delete_adapter("d")
    assert "d" not in layer.lora_variant and "d" not in layer.lora_magnitude_vector
    assert not any("magnitude" in n for n, _ in layer.named_parameters())


def test_dora_refusals_are_clear():
    with pytest.raises(ValueError, match="use_dora=True with lora_bias"):
        LoraLinear(torch.nn.Linear(8, 6), "d", r=2, use_dora=True, lora_bias=True)


@pytest.mark.parametrize("kind, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn"])])
def test_mixed_batch_with_per_row_magnitudes(kind, targets):
    """PEFT refuses DoRA in adapter_names batches; here each row gets its own adapter's m / n, and the
    mixed batch equals running every sequence alone (two DoRA adapters, a plain one, the base)."""
    from lora_triton.serving.batch import mixed_batch_check

    model = BUILDERS[kind]()
    for i, (name, dora) in enumerate((("d1", True), ("plain", False), ("d2", True))):
        lora_triton.inject_lora(model, lora_triton.LoraConfig(target_modules=targets, r=2 + i, use_dora=dora,
                                                              init_lora_weights=False), name)
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        with torch.no_grad():
            for mag in layer.lora_magnitude_vector.values():
                mag.weight.mul_(1 + 0.5 * torch.rand(mag.weight.shape))
    inputs = model_input(kind, batch=4)
    result = mixed_batch_check(model.eval(), ["d1", None, "plain", "d2"], inputs, atol=TOL)
    assert result["ok"], result


def test_bad_magnitude_files_are_refused_and_leave_the_model_alone(tmp_path):
    from safetensors.torch import load_file, save_file

    kind, kwargs = CASES["mlp"]
    _peft_trained(kind, kwargs, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(str(path))
    key = next(k for k in good if k.endswith("lora_magnitude_vector"))
    for bad, match in [({**good, key: good[key][:-1]}, "lora_magnitude_vector: shape"),
                       ({k: v for k, v in good.items() if k != key}, "lora_magnitude_vector is missing")]:
        save_file(bad, str(path), metadata={"format": "pt"})
        model = BUILDERS[kind]()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            lora_triton.load_adapter(model, str(tmp_path))
        after = model.state_dict()
        assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_adapter_pool_serves_dora_with_per_row_magnitudes(tmp_path):
    """Two DoRA adapters and a plain one through a 2-slot pool (evictions included): every row equals
    the model with that adapter loaded alone."""
    kind, targets = "llama", ["q_proj", "v_proj", "down_proj"]
    dirs = {}
    for i, (name, dora) in enumerate((("d1", True), ("p", False), ("d2", True))):
        model = lora_triton.inject_lora(BUILDERS[kind](), lora_triton.LoraConfig(
            target_modules=targets, r=2 + i, use_dora=dora, init_lora_weights=False))
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "magnitude" in n:
                    prm.mul_(1 + 0.5 * torch.rand(prm.shape))
        dirs[name] = str(tmp_path / name)
        lora_triton.save_adapter(model, dirs[name])
    inputs = model_input(kind, batch=2)
    alone = {}
    with torch.no_grad():
        for name, d in dirs.items():
            alone[name] = run(lora_triton.load_adapter(BUILDERS[kind](), d).eval(), inputs)
        alone[None] = run(BUILDERS[kind](), inputs)
    served = BUILDERS[kind]().eval()
    pool = lora_triton.AdapterPool(served, num_slots=2, max_rank=4, target_modules=targets)
    for name, d in dirs.items():
        pool.load(name, d)
    for names in (["d1", "p"], ["d2", None], ["d1", "d2"], ["p", "d1"]):
        with torch.no_grad(), pool.batch(names):
            out = run(served, inputs)
        for row, name in enumerate(names):
            assert max_diff(out[row], alone[name][row]) <= TOL, (names, name)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        good = lora_triton.read_peft_adapter(dirs["d1"])[1]
        pool.load("broken", {k: v for k, v in good.items() if "magnitude" not in k},
                  config=lora_triton.LoraConfig(target_modules=targets, r=2, use_dora=True))
