"""patch_peft: an existing PeftModel trains on our fused op with PEFT's tree, parameters and files untouched."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from models import max_diff, model_input, randomize_lora, run, tiny_gpt2, tiny_llama, tiny_mlp
from torch.utils._python_dispatch import TorchDispatchMode

import lora_triton as lt

peft = pytest.importorskip("peft", reason="patch_peft accelerates PEFT models")

FWD_OP = "lora_triton.lora_linear_fwd.default"
BWD_OP = "lora_triton.lora_linear_bwd.default"
TOL = 1e-5  # fp32, patched vs PEFT's own forward (different summation order only)


class CountOps(TorchDispatchMode):
    """Counts the aten / custom ops dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _peft_model(base, **kwargs):
    kwargs.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


def _rel_diff(got, expected) -> float:
    return max_diff(got, expected) / max(1.0, expected.abs().max().item())


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _train(model, inputs, steps: int, seed: int = 0, lr: float = 0.1):
    """SGD steps (Adam would turn rounding-level gradient differences into lr-sized ones); returns the losses."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = run(model, inputs).float().logsumexp(-1).mean() - run(model, inputs).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_patch_keeps_peft_tree_parameters_and_state_dict():
    pm = _peft_model(tiny_llama(), r=4, target_modules=LLAMA_TARGETS)
    before_modules = [(n, type(m)) for n, m in pm.named_modules()]
    before_params = {n: id(p) for n, p in pm.named_parameters()}
    before_state = {k: v.clone() for k, v in pm.state_dict().items()}
    summary = lt.patch_peft(pm)
    assert len(summary.patched) == 2 * len(LLAMA_TARGETS) and not summary.unsupported
    assert [(n, type(m)) for n, m in pm.named_modules()] == before_modules
    assert {n: id(p) for n, p in pm.named_parameters()} == before_params
    after_state = pm.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert lt.patch_peft(pm).patched == summary.patched  # idempotent
    assert lt.unpatch_peft(pm) == len(summary.patched)
    assert all("forward" not in m.__dict__ for m in pm.modules())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_patched_training_equals_peft_and_calls_the_fused_op(kind):
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    targets = LLAMA_TARGETS if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    # GPT-2: Conv1D bases, and bias="lora_only" makes the base biases trainable through the fused op too.
    pm = _peft_model(base, r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2",
                     bias="lora_only" if kind == "gpt2" else "none")
    randomize_lora(pm)
    twin = copy.deepcopy(pm)
    inputs = model_input(kind)
    steps = 3
    expected = _train(twin, inputs, steps)
    opt_params = _lora_params(pm)
    summary = lt.patch_peft(pm)
    with CountOps() as counter:
        losses = _train(pm, inputs, steps)
    layers = len(summary.patched)
    assert counter.counts[FWD_OP] == layers * 2 * steps  # two forwards per step
    assert counter.counts[BWD_OP] == layers * 2 * steps
    assert losses == pytest.approx(expected, abs=TOL)
    for name, p in _lora_params(pm).items():
        assert p is opt_params[name]
    twin_params = dict(twin.named_parameters())
    trained = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any("base_layer.bias" in n for n, _ in trained) == (kind == "gpt2")
    for name, p in trained:
        assert max_diff(p, twin_params[name]) < TOL, name


def test_dropout_uses_our_mask_and_matches_lora_triton_training(tmp_path):
    """p > 0: a patched PeftModel trains exactly like lora_triton's own layers from the same seed."""
    pm = _peft_model(tiny_llama(), r=4, lora_dropout=0.25, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(tiny_llama(), str(tmp_path), is_trainable=True)
    lt.nn.ungroup_siblings(ours)  # one op call per layer, in PEFT's order (same seed draws)
    inputs = model_input("llama")
    expected = _train(ours, inputs, 3, seed=5)
    lt.patch_peft(pm)
    losses = _train(pm, inputs, 3, seed=5)
    assert losses == pytest.approx(expected, abs=TOL)
    unpatched = _peft_model(tiny_llama(), r=4, lora_dropout=0.25, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora(unpatched)
    assert _train(unpatched, inputs, 1, seed=5)[0] != pytest.approx(expected[0], abs=TOL)  # nn.Dropout's mask


def _two_adapter_mlp(**kwargs):
    base = tiny_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, target_modules=["up", "down"],
                                                       **kwargs))
        pm.add_adapter("second", peft.LoraConfig(init_lora_weights=False, target_modules=["up", "down"], r=3,
                                                 lora_alpha=5, use_rslora=True, lora_bias=True))
    randomize_lora(pm)
    return pm.eval()


def test_multiple_active_adapters_lora_bias_rslora_outputs_and_grads():
    pm = _two_adapter_mlp(r=2, lora_alpha=4, lora_bias=True)
    pm.base_model.set_adapter(["default", "second"])
    twin = copy.deepcopy(pm)
    x = model_input("mlp")["x"].requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    lt.patch_peft(pm)
    with CountOps() as counter:
        y = pm(x=x)
        y.square().sum().backward()
    y2 = twin(x=x2)
    y2.square().sum().backward()
    assert counter.counts[FWD_OP] == 4 * 2  # 4 layers, two active adapters each
    assert max_diff(y, y2) < TOL
    assert _rel_diff(x.grad, x2.grad) < TOL
    twin_params = dict(twin.named_parameters())
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert any(".lora_B.second.bias" in n for n in grads)
    for name, g in grads.items():
        assert _rel_diff(g, twin_params[name].grad) < TOL, name


def test_mixed_batch_merged_and_disabled_states_are_peft_exact():
    pm = _two_adapter_mlp(r=2)
    twin = copy.deepcopy(pm)
    lt.patch_peft(pm)
    x = model_input("mlp", batch=3)["x"]
    names = ["default", "__base__", "second"]
    with torch.no_grad(), CountOps() as counter:
        assert torch.equal(pm(x=x, adapter_names=names), twin(x=x, adapter_names=names))
        with pm.disable_adapter(), twin.disable_adapter():
            assert torch.equal(pm(x=x), twin(x=x))
    assert counter.counts[FWD_OP] == 0  # both fall back to PEFT's forward
    pm.merge_adapter()
    twin.merge_adapter()
    with torch.no_grad():
        assert max_diff(pm(x=x), twin(x=x)) < TOL
    pm.unmerge_adapter()
    twin.unmerge_adapter()
    pm.set_adapter("second")
    twin.set_adapter("second")
    with torch.no_grad(), CountOps() as counter:
        assert max_diff(pm(x=x), twin(x=x)) < TOL
    assert counter.counts[FWD_OP] == 4


def test_unsupported_layers_reported_once_and_keep_peft_forward():
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "embed_tokens"], r=2,
                                                       init_lora_weights=False))
        pm.add_adapter("dora", peft.LoraConfig(target_modules=["v_proj"], r=2, use_dora=True,
                                               init_lora_weights=False))
    pm.base_model.set_adapter(["default", "dora"])
    twin = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match="keep PEFT's forward") as record:
        summary = lt.patch_peft(pm)
    assert len([w for w in record if "patch_peft" in str(w.message)]) == 1
    assert "model.embed_tokens" in " ".join(summary.unsupported)
    assert sum("LoRA variant" in why for why in summary.unsupported.values()) == 2  # the v_proj layers (DoRA)
    assert len([p for p in summary.patched if "q_proj" in p]) == 2
    inputs = model_input("llama")
    with torch.no_grad(), CountOps() as counter:
        assert max_diff(run(pm, inputs), run(twin, inputs)) < TOL
    assert counter.counts[FWD_OP] == 2  # q_proj only
    assert "embed_tokens" in str(summary)


def test_save_after_patched_training_reloads_in_peft(tmp_path):
    pm = _peft_model(tiny_llama(), r=4, target_modules=["q_proj", "v_proj"])
    lt.patch_peft(pm)
    inputs = model_input("llama")
    _train(pm, inputs, 2)
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert max_diff(run(pm, inputs), run(reloaded, inputs)) < TOL


def test_patch_peft_refuses_a_model_without_peft_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lt.patch_peft(tiny_mlp())


def test_plain_model_with_injected_peft_layers_is_patched():
    """What transformers' ``add_adapter`` builds (it needs peft >= 0.22 in transformers 5.24; 0.21.2 here)."""
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2,
                                                     init_lora_weights=False), model)
    randomize_lora(model)
    inputs = model_input("llama")
    with torch.no_grad():
        expected = run(model, inputs)
        summary = lt.patch_peft(model)
        with CountOps() as counter:
            got = run(model, inputs)
    assert len(summary.patched) == 4 and counter.counts[FWD_OP] == 4
    assert max_diff(got, expected) < TOL


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patched_layers_run_the_triton_kernels_in_the_interpreter(monkeypatch, dropout):
    """The Triton path (interpreter, fp32, tiny shapes): p=0 equals PEFT; p>0 equals our reference."""
    pytest.importorskip("triton", reason="the Triton kernels")
    pm = _peft_model(tiny_mlp(), r=3, lora_dropout=dropout, target_modules=["up", "down"])
    randomize_lora(pm)
    pm.train()
    expected_model = copy.deepcopy(pm)
    lt.patch_peft(pm)
    x = model_input("mlp", batch=1, seq=3)["x"]
    if dropout:
        lt.patch_peft(expected_model)  # the same mask on the reference backend
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    torch.manual_seed(0)
    expected_model(x=x).square().sum().backward()
    monkeypatch.setenv("LORA_TRITON_BACKEND", "triton")
    torch.manual_seed(0)
    with CountOps() as counter:
        pm(x=x).square().sum().backward()
    assert counter.counts[FWD_OP] == 4
    expected = dict(expected_model.named_parameters())
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert _rel_diff(p.grad, expected[name].grad) < 1e-4, name
