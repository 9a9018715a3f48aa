"""An HF Trainer script on a PeftModel that adds only ``lt.patch_peft(model)``: same run, fused op, resumable."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from models import VOCAB, max_diff, model_input, run, tiny_llama
from test_peft_patch import FWD_OP, CountOps

import lora_triton as lt

peft = pytest.importorskip("peft", reason="patch_peft accelerates PEFT models")
transformers = pytest.importorskip("transformers", reason="HF Trainer integration")

STEPS = 4
TOL = 1e-5


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_logged(model, out_dir: str, max_steps: int, resume_from=None, prepare=None) -> list:
    """HF Trainer on TokenData (checkpoints every 2 steps, seed 0, CPU), resumed from ``resume_from`` if
    given; ``prepare(trainer)`` runs before train. Returns the logged losses, one a step."""
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    if prepare is not None:
        prepare(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume_from)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _trainer_script(out_dir: str, patch: bool, max_steps: int = STEPS, resume_from=None, dropout: float = 0.0):
    """A plain PEFT + Trainer script; ``patch`` adds the one line."""
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "up_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)
    if patch:
        lt.patch_peft(model)  # the one added line
    return model, train_logged(model, out_dir, max_steps, resume_from)


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_with_patch_peft_equals_plain_peft_and_runs_the_fused_op(tmp_path):
    plain, plain_losses = _trainer_script(str(tmp_path / "plain"), patch=False)
    with CountOps() as counter:
        patched, losses = _trainer_script(str(tmp_path / "patched"), patch=True)
    assert counter.counts[FWD_OP] == 2 * 3 * STEPS  # 2 layers x 3 targets, one forward per step
    assert len(losses) == STEPS and losses == pytest.approx(plain_losses, abs=1e-4)  # logged rounded
    ours, theirs = _adapter(patched), _adapter(plain)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert max_diff(ours[name], theirs[name]) < TOL, name
    # What Trainer saved is PEFT's adapter folder; PEFT reloads it with the patched model's outputs.
    out = tmp_path / "patched" / f"checkpoint-{STEPS}"
    assert os.path.isfile(out / "adapter_config.json") and os.path.isfile(out / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    inputs = model_input("llama")
    with torch.no_grad():
        assert max_diff(run(patched.eval(), inputs), run(reloaded, inputs)) < TOL


def test_resume_from_checkpoint_equals_straight_run(tmp_path):
    """N steps straight == N/2 steps, then a new process-like run resuming from checkpoint N/2, with p > 0."""
    straight, straight_losses = _trainer_script(str(tmp_path / "straight"), patch=True, dropout=0.1)
    checkpoint = str(tmp_path / "straight" / f"checkpoint-{STEPS // 2}")
    with CountOps() as counter:
        resumed, resumed_losses = _trainer_script(str(tmp_path / "resumed"), patch=True, resume_from=checkpoint,
                                                  dropout=0.1)
    assert counter.counts[FWD_OP] == 2 * 3 * (STEPS // 2)  # PEFT's load_adapter kept the patched layers
    assert resumed_losses[STEPS // 2:] == pytest.approx(straight_losses[STEPS // 2:], abs=1e-4)  # logged rounded
    ours, theirs = _adapter(resumed), _adapter(straight)
    for name in ours:
        assert max_diff(ours[name], theirs[name]) < TOL, name
