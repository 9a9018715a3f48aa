"""The demo's shipped tasks (JSONL under ``data/``) and the offline word-level tokenizer.

Each task file holds ``{"text": ..., "label": ...}`` rows; every fifth row (file order) is the
eval split, the rest train, so the split never depends on the seed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
EVAL_EVERY = 5

# adapter name -> (data file, label names in label-id order). Both tasks have two labels so the
# one classifier shape serves both; each adapter trains its own copy (modules_to_save).
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sentiment": ("sentiment.jsonl", ("negative", "positive")),
    "topic": ("topic.jsonl", ("science", "sports")),
}


@dataclass
class Split:
    texts: list[str]
    labels: torch.Tensor  # int64 [n]


@dataclass
class Task:
    name: str
    label_names: tuple[str, ...]
    train: Split
    eval: Split


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with 'text' and 'label'")
            rows.append(row)
    return rows


def load_task(name: str, data_dir: str = DATA_DIR) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown demo task {name!r}; tasks: {sorted(TASKS)}")
    filename, label_names = TASKS[name]
    rows = read_jsonl(os.path.join(data_dir, filename))
    index = {label: i for i, label in enumerate(label_names)}
    bad = sorted({str(r["label"]) for r in rows if r["label"] not in index})
    if bad:
        raise ValueError(f"{filename}: labels {bad} are not among {list(label_names)}")
    parts: dict[bool, list[dict]] = {True: [], False: []}
    for i, row in enumerate(rows):
        parts[i % EVAL_EVERY == 0].append(row)

    def split(items: list[dict]) -> Split:
        return Split([r["text"] for r in items], torch.tensor([index[r["label"]] for r in items], dtype=torch.long))

    return Task(name, label_names, train=split(parts[False]), eval=split(parts[True]))


def load_tasks(data_dir: str = DATA_DIR) -> dict[str, Task]:
    return {name: load_task(name, data_dir) for name in TASKS}


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cased word-level tokenizer with BERT's special tokens; built offline from text."""

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

    def __init__(self, vocab: list[str], max_length: int = 64):
        if list(vocab[: len(self.specials)]) != list(self.specials):
            raise ValueError(f"vocab must start with {self.specials}")
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length
        self.pad_token_id = 0

    @classmethod
    def from_texts(cls, texts, max_length: int = 64) -> WordTokenizer:
        words = sorted({w for t in texts for w in _WORD.findall(t.lower())})
        return cls(list(cls.specials) + words, max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unk = self.ids["[UNK]"]
        ids = [self.ids.get(w, unk) for w in _WORD.findall(text.lower())]
        return [self.ids["[CLS]"]] + ids[: self.max_length - 2] + [self.ids["[SEP]"]]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for i, e in enumerate(encoded):
            input_ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.vocab) + "\n")

    @classmethod
    def load(cls, directory: str, max_length: int = 64) -> WordTokenizer:
        with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f if line.rstrip("\n")], max_length)
