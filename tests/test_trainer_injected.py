"""A lora_triton-injected transformers model saves like a PEFT model (save_pretrained, Trainer), and
inject_lora / load_adapter take PEFT's own LoraConfig."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from models import max_diff, model_input, randomize_lora, run, tiny_llama
from test_trainer_peft import TokenData, train_logged

import lora_triton as lt

peft = pytest.importorskip("peft", reason="PEFT reads what we save")
transformers = pytest.importorskip("transformers", reason="HF Trainer integration")

TOL = 1e-5


def _injected(**kwargs):
    model = tiny_llama()
    lt.inject_lora(model, lt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        **kwargs))
    randomize_lora(model)
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    return model


def _peft_load(directory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_llama(), directory, **kwargs).eval()


def test_save_pretrained_writes_peft_adapters(tmp_path):
    model = _injected(modules_to_save=["lm_head"])
    lt.inject_lora(model, lt.LoraConfig(r=2, target_modules=["o_proj"]), adapter_name="other")
    randomize_lora(model, seed=9)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    inputs = model_input("llama")
    with torch.no_grad():
        expected = run(model, inputs)
        assert max_diff(run(_peft_load(tmp_path), inputs), expected) < TOL
        assert max_diff(run(lt.load_adapter(tiny_llama(), str(tmp_path)), inputs), expected) < TOL
        lt.set_adapter(model, "other")
        other = run(model, inputs)
        assert max_diff(run(_peft_load(tmp_path / "other"), inputs), other) < TOL
    with pytest.raises(KeyError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    assert not os.path.exists(tmp_path / "x")


def test_full_model_save_stays_available(tmp_path):
    model = _injected()
    inputs = model_input("llama")
    with torch.no_grad():
        expected = run(model, inputs)
    model.save_pretrained(tmp_path / "full", full_model=True)
    assert os.path.isfile(tmp_path / "full" / "model.safetensors")
    lt.merge_and_unload(model).save_pretrained(tmp_path / "merged")  # no adapter left: transformers' save
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_diff(run(reloaded, inputs), expected) < TOL


def test_trainer_save_model_and_checkpoints_are_peft_adapters(tmp_path):
    model = _injected(lora_dropout=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    inputs = model_input("llama")
    with torch.no_grad():
        expected = run(model, inputs)
    for folder in (tmp_path / "final", tmp_path / "checkpoint-2"):
        assert os.path.isfile(folder / "adapter_config.json") and not os.path.exists(folder / "model.safetensors")
        with torch.no_grad():
            assert max_diff(run(_peft_load(folder), inputs), expected) < TOL, folder


def test_inject_and_load_accept_peft_lora_config(tmp_path):
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                               lora_dropout=0.05, task_type="CAUSAL_LM")
    ours = lt.inject_lora(tiny_llama(), peft_cfg)
    cfg = lt.nn.adapter_configs(ours)["default"]
    assert isinstance(cfg, lt.LoraConfig) and cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout, cfg.task_type) == (4, 16, True, 0.05, "CAUSAL_LM")
    randomize_lora(ours)
    lt.save_adapter(ours, str(tmp_path))
    loaded = lt.load_adapter(tiny_llama(), str(tmp_path), config=peft_cfg)
    inputs = model_input("llama")
    with torch.no_grad():
        assert max_diff(run(loaded, inputs), run(ours.eval(), inputs)) < TOL
    with pytest.raises(NotImplementedError, match="use_qalora"):
        lt.inject_lora(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], use_qalora=True))
    with pytest.raises(TypeError, match="lora_triton.LoraConfig or a peft.LoraConfig, got LoHaConfig"):
        lt.inject_lora(tiny_llama(), peft.LoHaConfig(target_modules=["q_proj"]))


def test_inject_into_an_eval_model_keeps_eval_mode():
    """Evaluation right after injection draws no dropout masks (new modules take the wrapped layer's mode)."""
    model = _injected(lora_dropout=0.5, modules_to_save=["lm_head"])
    assert not any(m.training for m in model.modules())
    inputs = model_input("llama")
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(model, inputs))


def test_print_trainable_parameters_like_peft(capsys):
    model = _injected(modules_to_save=["lm_head"])
    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    trainable, total = lt.trainable_parameters(model)
    assert 0 < trainable < total
    assert ours.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                            f"trainable%: {100 * trainable / total:.4f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out
    lt.print_trainable_parameters(pm)
    assert capsys.readouterr().out == theirs


def test_save_pretrained_takes_adapter_values_from_a_gathered_state_dict(tmp_path):
    """Trainer passes ``state_dict=`` under FSDP / DeepSpeed: the adapter values come from it."""
    from safetensors.torch import load_file

    model = _injected(modules_to_save=["lm_head"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    head = "lm_head.modules_to_save.default.weight"
    state[key] += 1.0
    state[head] += 2.0
    model.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], state[key])
    assert torch.equal(saved["base_model.model.lm_head.weight"], state[head])
    assert torch.equal(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                       model.state_dict()["model.layers.1.self_attn.q_proj.lora_A.default.weight"])


def _injected_trainer_run(out_dir: str, max_steps: int, resume_from=None, dropout: float = 0.1):
    """An HF Trainer script on a lora_triton-injected model (modules_to_save too); resume needs one line."""
    model = tiny_llama()
    torch.manual_seed(0)
    lt.inject_lora(model, lt.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, modules_to_save=["lm_head"],
                                        target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_lora(model)
    return model, train_logged(model, out_dir, max_steps, resume_from, prepare=lt.enable_trainer_resume)


def test_trainer_resume_of_an_injected_model_equals_the_straight_run(tmp_path):
    """4 steps straight == 2 steps, then a fresh model resuming from checkpoint-2 (adapters, head copy,
    optimizer and RNG state), with dropout on."""
    straight, straight_losses = _injected_trainer_run(str(tmp_path / "straight"), 4)
    checkpoint = str(tmp_path / "straight" / "checkpoint-2")
    resumed, resumed_losses = _injected_trainer_run(str(tmp_path / "resumed"), 4, resume_from=checkpoint)
    assert len(resumed_losses) == len(straight_losses) == 4  # the first two restored from trainer_state.json
    assert resumed_losses[2:] == pytest.approx(straight_losses[2:], abs=1e-4)  # logged rounded
    ours = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and any("modules_to_save" in n for n in ours)
    for name in ours:
        assert max_diff(ours[name], theirs[name]) < TOL, name


def test_resume_from_a_checkpoint_of_another_adapter_shape_changes_nothing(tmp_path):
    model = _injected()
    model.save_pretrained(tmp_path / "r4")
    other = tiny_llama()
    lt.inject_lora(other, lt.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        lt.load_checkpoint_adapters(other, tmp_path / "r4")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        lt.load_checkpoint_adapters(other, tmp_path / "missing")
