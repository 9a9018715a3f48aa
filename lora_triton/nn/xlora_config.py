"""XLoraConfig: PEFT's X-LoRA field names and defaults (peft_type "XLORA"), validated, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

from ..config import PeftConfigFields
from ..config_checks import check_int, check_number, check_probability, is_int
from ..io.atomic import atomic_write_text
from ..io.config_json import CONFIG_NAME, load_config_json

_IGNORED = {"auto_mapping", "peft_version", "runtime_config"}


@dataclass
class XLoraConfig(PeftConfigFields):
    hidden_size: Optional[int] = None
    adapters: Optional[dict] = None  # expert name -> PEFT LoRA adapter directory
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    peft_type: str = "XLORA"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        if peft_type != "XLORA":
            raise ValueError(f"peft_type must be 'XLORA' for an XLoraConfig, got {peft_type!r}")
        self.peft_type = peft_type
        self.validate_bookkeeping()
        # PEFT falls back to hidden_size=4096 with a warning; a wrong size only fails later, so ask for it.
        if not is_int(self.hidden_size) or self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be the base model's hidden size (a positive int), "
                             f"got {self.hidden_size!r}")
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ValueError(f"adapters must be a non-empty dict of expert name -> adapter directory, "
                             f"got {self.adapters!r}")
        for name in self.adapters:
            if not isinstance(name, str) or not name or "." in name or name == "__base__":
                raise ValueError(f"expert names must be non-empty strings without '.', got {name!r}")
        n = len(self.adapters)
        if self.top_k_lora is not None and (not is_int(self.top_k_lora) or not 1 <= self.top_k_lora <= n):
            raise ValueError(f"top_k_lora must be None or an int in [1, {n}] (the number of experts), "
                             f"got {self.top_k_lora!r}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("enable_softmax_topk=True needs top_k_lora")
        check_int("xlora_depth", self.xlora_depth)
        check_int("xlora_size", self.xlora_size)
        check_probability("xlora_dropout_p", self.xlora_dropout_p)
        check_number("softmax_temperature", self.softmax_temperature, low=0.0, low_open=True)
        check_number("scaling_pass_value", self.scaling_pass_value)
        check_number("global_scaling_weight", self.global_scaling_weight)
        if self.enable_softmax and self.enable_softmax_topk:
            warnings.warn("enable_softmax and enable_softmax_topk are both on (PEFT warns: worse performance)",
                          stacklevel=3)

    @property
    def expert_names(self) -> list[str]:
        return list(self.adapters)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        # No sort_keys: the order of `adapters` is the order of the classifier's outputs.
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict) -> XLoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED)
        if unknown:
            warnings.warn(f"X-LoRA config keys {unknown} are unknown to lora_triton and were ignored", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str) -> XLoraConfig:
        """The config in ``directory`` (or that adapter_config.json itself), read by the shared reader."""
        return cls.from_dict(load_config_json(directory))
