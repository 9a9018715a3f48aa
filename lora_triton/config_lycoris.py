"""LoHaConfig and LoKrConfig: PEFT's LyCORIS configs (field names, defaults, peft_type LOHA / LOKR).

Targeting fields (target_modules, exclude_modules, layers_to_transform, layers_pattern, rank_pattern,
alpha_pattern, modules_to_save) mean what they mean in LoraConfig. Scaling is alpha / r, per module
after the pattern lookup — for LoKr even when both Kronecker factors are full matrices (PEFT's rule,
followed so PEFT's files give PEFT's outputs; LyCORIS itself uses 1 there).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from .config import _IGNORED, AdapterConfigFile, _pattern_key
from .config_checks import check_int, check_number, check_probability, is_int, show


@dataclass
class _LycorisConfig(AdapterConfigFile):
    r: int = 8
    alpha: Union[int, float] = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    peft_type: str = ""  # LoHaConfig / LoKrConfig: their PEFT_TYPE
    PEFT_TYPE = ""
    INIT_CHOICES = (True, False)

    def __post_init__(self):
        self.normalize_targeting()
        self.validate()

    def validate(self) -> None:
        peft_type = getattr(self.peft_type, "value", self.peft_type) or self.PEFT_TYPE
        if peft_type != self.PEFT_TYPE:
            raise ValueError(f"peft_type: {type(self).__name__} is {self.PEFT_TYPE!r}, got {peft_type!r}")
        self.peft_type = peft_type
        self.validate_bookkeeping()
        check_int("r", self.r)
        check_number("alpha", self.alpha)
        for name in ("rank_dropout", "module_dropout"):
            check_probability(name, getattr(self, name))
        if not any(self.init_weights is c or self.init_weights == c and isinstance(c, str) for c in self.INIT_CHOICES):
            raise ValueError(f"init_weights must be one of {self.INIT_CHOICES}, got {self.init_weights!r}")
        self.validate_targeting()

    def rank_for(self, module_path: str) -> int:
        key = _pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> Union[int, float]:
        key = _pattern_key(self.alpha_pattern, module_path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module_path: str) -> float:
        return self.alpha_for(module_path) / self.rank_for(module_path)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _IGNORED:
                warnings.warn(f"adapter config key {key!r} is unknown to lora_triton and was ignored", stacklevel=2)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str):
        from .nn.kinds import read_config

        config = read_config(directory)
        if not isinstance(config, cls):
            raise ValueError(f"{directory} holds a {config.peft_type} adapter, not {cls.PEFT_TYPE}")
        return config


@dataclass
class LoHaConfig(_LycorisConfig):
    """PEFT's LoHaConfig: dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r (Hadamard product)."""

    peft_type: str = "LOHA"
    PEFT_TYPE = "LOHA"


@dataclass
class LoKrConfig(_LycorisConfig):
    """PEFT's LoKrConfig: dW = kron(w1, w2) * alpha / r, the factors full or low-rank."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    peft_type: str = "LOKR"
    PEFT_TYPE = "LOKR"
    INIT_CHOICES = (True, False, "lycoris")

    def validate(self) -> None:
        super().validate()
        if not is_int(self.decompose_factor) or self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 (near the square root) or a positive int, "
                             f"got {show(self.decompose_factor)}")
