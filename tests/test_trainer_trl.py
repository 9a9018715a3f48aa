"""TRL's SFTTrainer on a tiny Llama: a lora_triton-injected model and a patched PeftModel both train and save
an adapter PEFT loads (offline: an in-memory word-level tokenizer)."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import VOCAB, max_diff, model_input, run, tiny_llama
from test_peft_patch import FWD_OP, CountOps

import lora_triton as lt

trl = pytest.importorskip("trl", reason="TRL's SFTTrainer is the tested trainer")
peft = pytest.importorskip("peft", reason="PEFT loads what SFTTrainer saved")
datasets = pytest.importorskip("datasets", reason="SFTTrainer takes a datasets.Dataset")

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far", "a", "red", "blue", "big"]
STEPS = 2


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", *WORDS])}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _dataset():
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) for _ in range(8)]
    return datasets.Dataset.from_dict({"text": texts})


def _sft(model, out_dir):
    args = trl.SFTConfig(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
                         max_length=16, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                         disable_tqdm=True, dataset_text_field="text", bf16=False)  # CPU default is bf16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
        with CountOps() as counter:
            trainer.train()
        trainer.save_model(str(out_dir / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)  # trained, finite
    return counter.counts, args


def _check_peft_reload(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()
    inputs = model_input("llama")
    with torch.no_grad():
        assert max_diff(run(model.eval(), inputs), run(reloaded, inputs)) < 1e-5


def test_sft_trainer_on_an_injected_model(tmp_path):
    model = lt.inject_lora(tiny_llama(), lt.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    counts, _ = _sft(model, tmp_path)
    assert sum(n for op, n in counts.items() if op.startswith("lora_triton.") and "fwd" in op) > 0  # q/v: grouped
    after = dict(model.named_parameters())
    assert any(max_diff(after[n], v) > 0 for n, v in before.items())
    _check_peft_reload(model, tmp_path / "final")


def test_sft_trainer_on_a_patched_peft_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    summary = lt.patch_peft(model)
    counts, args = _sft(model, tmp_path)
    recomputed = 2 if args.gradient_checkpointing else 1  # SFTConfig checkpoints by default: forwards run twice
    assert counts[FWD_OP] == len(summary.patched) * STEPS * recomputed
    _check_peft_reload(model, tmp_path / "final")
