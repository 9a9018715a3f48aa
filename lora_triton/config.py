"""LoraConfig with PEFT's field names and defaults; reads and writes adapter_config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .config_checks import check_int, check_number, check_probability, is_int, show
from .io.atomic import atomic_write_text
from .io.config_json import CONFIG_NAME, load_config_json, read_config_json  # noqa: F401  (re-exported)
from .patterns import check_pattern, match

ALL_LINEAR = "all-linear"
INIT_CHOICES = (True, False, "gaussian", "orthogonal", "eva", "loftq")
# Initialisations that leave the base weights alone and give a plain LoRA adapter: such adapters
# load and run here, but lora_triton cannot initialise new ones this way.
LOAD_ONLY_INITS = ("orthogonal", "eva")
BIAS_CHOICES = ("none", "all", "lora_only")

# PEFT fields for features we do not implement: accepted at their default, an error otherwise,
# so a file that needs them is never loaded with them silently ignored.
_UNSUPPORTED_AT_DEFAULT: dict[str, Any] = {
    "megatron_config": None,
    "trainable_token_indices": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}
# PEFT fields that carry no meaning for the weights: read and dropped without a word.
_IGNORED = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}


@dataclass(kw_only=True)
class PeftConfigFields:
    """PEFT's bookkeeping fields, the same in every config class (LoRA / DoRA, AdaLoRA, LoHa, LoKr, X-LoRA);
    each class declares its own ``peft_type`` field (with its default) and checks it. Keyword-only, so a
    config class's positional arguments stay its own leading fields (``LoraConfig(16)`` is r=16)."""

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate_bookkeeping(self) -> None:
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode must be a bool (true/false), got {show(self.inference_mode)}")
        for name in ("task_type", "base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {show(getattr(self, name))}")


class AdapterConfigFile(PeftConfigFields):
    """adapter_config.json for every adapter config class but X-LoRA's: its text (``to_peft_dict`` as sorted
    JSON) and an atomic save."""

    def to_peft_dict(self) -> dict:
        """The dict PEFT writes (subclasses add PEFT's own fields): a target_modules list as a sorted set."""
        out = self.to_dict()
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(set(out["target_modules"]))
        return out

    def to_json_string(self) -> str:
        """The text of adapter_config.json."""
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), self.to_json_string())

    def validate_targeting(self) -> None:
        """The targeting fields every config class with PEFT's targeting shares (LoRA / DoRA, AdaLoRA, LoHa,
        LoKr): target_modules, exclude_modules, layers_pattern, modules_to_save, layers_to_transform,
        rank_pattern, alpha_pattern; regexes compiled up front (``patterns.check_pattern``)."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if not (name == "target_modules" and value.lower() == ALL_LINEAR):
                    check_pattern(name, value)
            elif value is not None:
                _check_str_list(name, value, "a regex string, a list of module names, or None")
        for name in ("layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                _check_str_list(name, value, "a list of strings or None")
                for item in value:
                    check_pattern(f"{name} entry", item)
        if self.layers_to_transform is not None and (
                not isinstance(self.layers_to_transform, list)
                or not all(is_int(i) and i >= 0 for i in self.layers_to_transform)):
            raise ValueError("layers_to_transform must be a layer index or a list of them (ints >= 0), "
                             f"got {show(self.layers_to_transform)}")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of regex -> value, got {getattr(self, name)!r}")
            for key in getattr(self, name):
                check_pattern(f"{name} key", key)
        for key, rank in self.rank_pattern.items():
            check_int(f"rank_pattern[{key!r}]", rank)
        for key, alpha in self.alpha_pattern.items():
            check_number(f"alpha_pattern[{key!r}]", alpha)
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern is only used together with layers_to_transform")

    def normalize_targeting(self) -> None:
        """The targeting fields in one form: sets / tuples of names as sorted lists, a single layer index or
        layers_pattern as a one-element list (as PEFT accepts them)."""
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value, key=str))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]


@dataclass
class LoraConfig(AdapterConfigFile):
    r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    lora_bias: bool = False
    loftq_config: dict = field(default_factory=dict)  # init_lora_weights="loftq": nn/loftq.py
    ensure_weight_tying: bool = False  # adapters on tied embedding / head share their factors: nn/weight_tying.py
    peft_type: str = "LORA"

    def __post_init__(self):
        self.normalize_targeting()
        self.validate()

    def validate(self) -> None:
        """Check every field's type and value (ValueError naming the field, what was expected, what came).

        Runs on construction and again before a config is used (load / inject), so a field changed
        after construction is caught before the model is touched.
        """
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        if peft_type != "LORA":
            raise ValueError(f"peft_type: only 'LORA' adapters are supported, got {peft_type!r}")
        self.peft_type = peft_type
        check_int("r", self.r)
        check_number("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (true/false), got {show(getattr(self, name))}")
        self.validate_bookkeeping()
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (PEFT refuses it too)")
        if self.init_lora_weights not in INIT_CHOICES or isinstance(self.init_lora_weights, (int, float)) and \
                not isinstance(self.init_lora_weights, bool):
            raise NotImplementedError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported (supported: True, False, "
                "'gaussian', 'loftq'; 'orthogonal'/'eva' adapters load); pissa/olora/corda initialisations modify "
                "the base weights, mica changes the forward")
        if self.init_lora_weights == "loftq":
            from .nn.loftq import check_loftq_config

            check_loftq_config(self.loftq_config, self.use_dora)
        self.validate_targeting()

    # PEFT semantics: the first pattern key matching `(.*\.)?(key)$` on the module path wins.
    def rank_for(self, module_path: str) -> int:
        key = _pattern_key(self.rank_pattern, module_path, "rank_pattern")
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> Union[int, float]:
        key = _pattern_key(self.alpha_pattern, module_path, "alpha_pattern")
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_path: str) -> float:
        r = self.rank_for(module_path)
        alpha = self.alpha_for(module_path)
        return alpha / r**0.5 if self.use_rslora else alpha / r

    def to_peft_dict(self) -> dict:
        """The dict PEFT writes: our fields, plus PEFT's own fields at their defaults."""
        out = super().to_peft_dict()
        for key, default in _UNSUPPORTED_AT_DEFAULT.items():
            out.setdefault(key, default)
        out["megatron_core"] = "megatron.core"
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _UNSUPPORTED_AT_DEFAULT:
                if key == "eva_config" and data.get("init_lora_weights") == "eva":
                    continue  # EVA only chose the initial values; the adapter is plain LoRA
                if value not in (_UNSUPPORTED_AT_DEFAULT[key], None, {}, False):
                    raise NotImplementedError(f"{key}={value!r} is not supported by lora_triton")
            elif key not in _IGNORED:
                warnings.warn(f"adapter config key {key!r} is unknown to lora_triton and was ignored",
                              stacklevel=2)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str) -> LoraConfig:
        return cls.from_dict(load_config_json(directory))


def as_lora_config(config) -> LoraConfig:
    """Ours unchanged; PEFT's ``peft.LoraConfig`` converted field by field (unsupported values refused
    exactly as when reading its adapter_config.json); anything else is a TypeError."""
    if isinstance(config, LoraConfig):
        return config
    if type(config).__name__ == "LoraConfig" and type(config).__module__.startswith("peft.") and \
            callable(getattr(config, "to_dict", None)):
        data = dict(config.to_dict())
        data["task_type"] = getattr(data.get("task_type"), "value", data.get("task_type"))
        return LoraConfig.from_dict(data)
    raise TypeError(f"config must be a lora_triton.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")


def _pattern_key(patterns: dict, module_path: str, field: str = "rank_pattern / alpha_pattern") -> Optional[str]:
    for key in patterns:
        if match(rf"(.*\.)?({key})$", module_path, field):
            return key
    return None


def _check_str_list(field: str, value, expected: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field} must be {expected}, got {show(value)}")
