"""AdaLoRA beyond one plain adapter, each against the real PEFT: bias != "none" and modules_to_save (same
training steps, rank patterns and files both ways), merge / unmerge / merge_and_unload, several adapters on
one model (PEFT's rule: one trainable, the others in inference mode) and save_adapter / load_adapter."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from models import max_diff, model_input, tiny_gpt2, tiny_llama

import lora_triton as lt
from lora_triton.nn.adalora import ONE_TRAINABLE, SVDLinear, adalora_state

GPT2 = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_r=4, target_r=2, tinit=1, tfinal=1,
            total_step=5, lora_alpha=8)
LLAMA = dict(target_modules=["q_proj", "v_proj"], init_r=3, target_r=1, tinit=0, tfinal=1, total_step=4,
             lora_alpha=6)
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _peft(kind: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(BUILD[kind](), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {_strip(n): p for n, p in model.named_parameters() if p.requires_grad}


def _train(models, kind: str, steps: int, seed: int = 0):
    """SGD on the same batches, the allocator after each step; returns the losses per step."""
    opts = [torch.optim.SGD(list(_trainable(m).values()), lr=0.5) for m in models]
    history = []
    for step in range(steps):
        inputs = model_input(kind, seed=seed + step)
        losses = []
        for model, opt in zip(models, opts):
            model.train()
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            if isinstance(model, peft.PeftModel):
                model.base_model.update_and_allocate(step)
            else:
                lt.update_and_allocate(model, step)
            opt.zero_grad()
            model.eval()
            losses.append(loss.item())
        history.append(losses)
    return history


def _logits(model, kind: str, seed: int = 50) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_input(kind, seed=seed)).logits


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_and_modules_to_save_train_like_peft_and_load_both_ways(bias, tmp_path):
    kw = dict(GPT2, bias=bias, modules_to_save=["ln_f"])
    pm = _peft("gpt2", **kw)
    ours = lt.inject_adalora(tiny_gpt2(), lt.AdaLoraConfig(**kw))
    theirs = _trainable(pm)
    assert sorted(_trainable(ours)) == sorted(theirs)
    assert any(".bias" in n and "lora_" not in n for n in theirs) and any("modules_to_save" in n for n in theirs)
    with torch.no_grad():
        for n, p in _trainable(ours).items():
            p.copy_(theirs[n])
    for step, (loss_p, loss_o) in enumerate(_train((pm, ours), "gpt2", GPT2["total_step"])):
        assert abs(loss_p - loss_o) <= 1e-5 * abs(loss_p), step
    pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert adalora_state(ours).config.rank_pattern == pattern
    assert max_diff(_logits(ours, "gpt2"), _logits(pm, "gpt2")) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"))
    lt.save_adapter(ours, str(tmp_path / "ours"))  # dispatched to save_adalora by the adapter's peft_type
    loaded = lt.load_adapter(tiny_gpt2(), str(tmp_path / "peft")).eval()
    assert max_diff(_logits(loaded, "gpt2"), _logits(pm, "gpt2")) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
    assert max_diff(_logits(back, "gpt2"), _logits(ours, "gpt2")) <= 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """PEFT AdaLoRA adapters after a full schedule on GPT-2 (Conv1D) and Llama, and their folders."""
    out = {}
    for kind, kw in (("gpt2", GPT2), ("llama", LLAMA)):
        folders = []
        for i in range(2):
            pm = _peft(kind, **kw)
            _train((pm,), kind, kw["total_step"], seed=10 * i)
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():  # a few SGD steps move the adapter little: random values (the masks kept)
                for n, p in sorted(pm.named_parameters()):
                    if "lora_" in n:
                        p.copy_(torch.where(p != 0, torch.randn(p.shape, generator=g) * 0.3, p))
            folder = str(tmp_path_factory.mktemp(f"{kind}{i}"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm.save_pretrained(folder)
            folders.append(folder)
        out[kind] = folders
    return out


def _peft_loaded(kind: str, folders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(BUILD[kind](), folders[0]).eval()
        for i, folder in enumerate(folders[1:], 1):
            pm.load_adapter(folder, adapter_name=f"x{i}")
    return pm


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_unmerge_and_unload_equal_peft(kind, trained):
    pm = _peft_loaded(kind, trained[kind][:1])
    ours = lt.load_adapter(BUILD[kind](), trained[kind][0]).eval()
    want = _logits(pm, kind)
    assert max_diff(_logits(ours, kind), want) <= 1e-5
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    lt.merge_adapter(ours)
    assert all(layer.merged_adapters == ["default"] for _, layer in ours.named_modules()
               if isinstance(layer, SVDLinear))
    assert max_diff(_logits(ours, kind), want) <= 1e-5
    with lt.disable_adapters(ours):
        with torch.no_grad():
            base = BUILD[kind]()(**model_input(kind, seed=50)).logits
        assert max_diff(_logits(ours, kind), base) <= 1e-5  # disabling unmerges first
    assert max_diff(want, base) > 1e-3
    lt.merge_adapter(ours)
    lt.unmerge_adapter(ours)
    after = dict(ours.named_parameters())
    assert max(max_diff(after[n], p) for n, p in before.items()) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_theirs = pm.merge_and_unload()
    plain = lt.merge_and_unload(ours)
    assert not any(isinstance(m, SVDLinear) for m in plain.modules())
    assert max_diff(_logits(plain, kind), _logits(plain_theirs, kind)) <= 1e-5


def test_several_adapters_switch_like_peft_and_save_each(trained, tmp_path):
    folders = trained["llama"]
    pm = _peft_loaded("llama", folders)
    ours = lt.load_adapter(tiny_llama(), folders[0])
    lt.load_adapter(ours, folders[1], adapter_name="x1")
    ours.eval()
    for name in ("default", "x1"):
        pm.set_adapter(name)
        lt.set_adapter(ours, name)
        assert max_diff(_logits(ours, "llama"), _logits(pm, "llama")) <= 1e-5, name
    assert max_diff(_logits(ours, "llama"), _logits(lt.load_adapter(tiny_llama(), folders[0]).eval(), "llama")) > 1e-3
    lt.save_adapter(ours, str(tmp_path / "x1"), adapter_name="x1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "x1")).eval()
    assert max_diff(_logits(back, "llama"), _logits(ours, "llama")) <= 1e-5
    lt.set_adapter(ours, ["default", "x1"])  # both at once: the sum of both deltas
    pm.base_model.set_adapter(["default", "x1"])
    assert max_diff(_logits(ours, "llama"), _logits(pm, "llama")) <= 1e-5


def test_only_one_trainable_adapter_as_in_peft():
    pm = _peft("llama", **LLAMA)
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("other", peft.AdaLoraConfig(**LLAMA))
    ours = lt.inject_adalora(tiny_llama(), lt.AdaLoraConfig(**LLAMA))
    lt.inject_adalora(ours, lt.AdaLoraConfig(**LLAMA, inference_mode=True), "frozen")
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith(".frozen"))
    assert all(p.requires_grad for n, p in ours.named_parameters() if n.endswith("lora_A.default"))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="supports only 1 trainable adapter") as info:
        lt.inject_adalora(ours, lt.AdaLoraConfig(**LLAMA), "other")
    assert str(info.value) == ONE_TRAINABLE
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    inputs = model_input("llama")
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    lt.update_and_allocate(ours, 0)  # the inference adapter has no gradients and is not scored
    assert all(n.endswith(".default") for n in adalora_state(ours).allocator.exp_avg_ipt)


def test_lora_and_adalora_do_not_mix():
    model = lt.inject_lora(tiny_llama(), lt.LoraConfig(target_modules=["k_proj"], r=2))
    with pytest.raises(ValueError, match="non-AdaLoRA adapters"):
        lt.inject_adalora(model, lt.AdaLoraConfig(**LLAMA), "ada")


def test_adalora_is_a_kind_on_the_registry():
    from lora_triton.nn import kinds

    config = kinds.config_from_dict({"peft_type": "ADALORA", **LLAMA})
    assert type(config) is lt.AdaLoraConfig and kinds.kind_of(config).peft_type == "ADALORA"
    model = lt.inject_lora(tiny_llama(), config)  # inject_lora hands AdaLoRA configs to inject_adalora
    assert isinstance(model.model.layers[0].self_attn.q_proj, SVDLinear) and adalora_state(model).allocator
    with pytest.raises(TypeError, match="another kind"):
        lt.inject_lora(model, lt.LoraConfig(target_modules=["q_proj"], r=2), "lora")
    with pytest.raises(TypeError, match="LoRA adapters only"):
        lt.add_weighted_adapter(model, ["default"], [1.0], "m")  # PEFT's AdaLoRA refuses it too
