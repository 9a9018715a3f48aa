"""Every adapter config class checks its numbers by the one rule set of ``config_checks``: non-numbers
(strings, bools), NaN / inf and out-of-range values are a ValueError naming the field and the value. The
configs that target modules share one targeting check (``AdapterConfigFile.validate_targeting``)."""

from __future__ import annotations

import json

import pytest

from lora_triton import LoraConfig
from lora_triton.config_lycoris import LoHaConfig, LoKrConfig
from lora_triton.nn.adalora import AdaLoraConfig
from lora_triton.nn.xlora_config import XLoraConfig

NAN, INF = float("nan"), float("inf")
BASE = {
    LoraConfig: {},
    LoHaConfig: {},
    LoKrConfig: {},
    AdaLoraConfig: {"total_step": 10},
    XLoraConfig: {"hidden_size": 8, "adapters": {"0": "/a", "1": "/b"}},
}
CASES = [
    (LoraConfig, "lora_alpha", NAN, "must be finite, got nan"),
    (LoHaConfig, "alpha", NAN, "must be finite, got nan"),
    (LoHaConfig, "alpha", INF, "must be finite, got inf"),
    (LoHaConfig, "alpha", "8", "must be a number, got str '8'"),
    (LoHaConfig, "alpha", True, "must be a number, got bool True"),
    (LoHaConfig, "rank_dropout", NAN, "must be finite, got nan"),
    (LoHaConfig, "module_dropout", 1.0, r"must be in \[0, 1\), got 1.0"),
    (LoHaConfig, "module_dropout", "0.1", "must be a number, got str '0.1'"),
    (LoHaConfig, "r", True, "must be a positive int, got bool True"),
    (LoKrConfig, "alpha", -INF, "must be finite, got -inf"),
    (LoKrConfig, "rank_dropout", -0.1, r"must be in \[0, 1\), got -0.1"),
    (LoKrConfig, "decompose_factor", True, r"must be -1 \(near the square root\) or a positive int, got bool True"),
    (AdaLoraConfig, "lora_alpha", INF, "must be finite, got inf"),
    (AdaLoraConfig, "beta1", NAN, "must be finite, got nan"),
    (AdaLoraConfig, "beta2", 1.0, r"must be in \(0, 1\), got 1.0"),
    (AdaLoraConfig, "orth_reg_weight", NAN, "must be finite, got nan"),
    (AdaLoraConfig, "orth_reg_weight", -1.0, "must be >= 0, got -1.0"),
    (AdaLoraConfig, "tinit", True, "must be an int >= 0, got bool True"),
    (AdaLoraConfig, "init_r", 12.0, "must be a positive int, got float 12.0"),
    (XLoraConfig, "softmax_temperature", NAN, "must be finite, got nan"),
    (XLoraConfig, "softmax_temperature", 0.0, "must be > 0, got 0.0"),
    (XLoraConfig, "global_scaling_weight", INF, "must be finite, got inf"),
    (XLoraConfig, "scaling_pass_value", "0", "must be a number, got str '0'"),
    (XLoraConfig, "xlora_dropout_p", NAN, "must be finite, got nan"),
    (XLoraConfig, "xlora_depth", True, "must be a positive int, got bool True"),
    (XLoraConfig, "xlora_size", 0, "must be a positive int, got int 0"),
]


@pytest.mark.parametrize("cls, field, value, message", CASES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_every_config_refuses_bad_numbers_naming_field_and_value(cls, field, value, message):
    with pytest.raises(ValueError, match=f"{field}.? {message}"):
        cls(**BASE[cls], **{field: value})


@pytest.mark.parametrize("value, message", [(NAN, "must be finite"), (INF, "must be finite"),
                                            ("1", "must be a number")])
def test_dora_options_follow_the_lora_rules(value, message):
    for config in (LoraConfig(use_dora=True), LoraConfig(use_dora=True, alpha_pattern={"up": 1})):
        config.lora_alpha = value
        with pytest.raises(ValueError, match=f"lora_alpha {message}"):
            config.validate()
    with pytest.raises(ValueError, match=rf"alpha_pattern\['up'\] {message}"):
        LoraConfig(use_dora=True, alpha_pattern={"up": value})


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_lycoris_alpha_pattern_values_are_checked(cls):
    with pytest.raises(ValueError, match=r"alpha_pattern\['up'\] must be finite, got nan"):
        cls(alpha_pattern={"up": NAN})
    with pytest.raises(ValueError, match=r"alpha_pattern\['up'\] must be a number"):
        cls(alpha_pattern={"up": "2"})
    assert cls(alpha_pattern={"up": 2.5}).alpha_for("layers.0.up") == 2.5


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_lycoris_json_nan_alpha_refused(cls, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": cls.PEFT_TYPE, "alpha": NAN}))
    with pytest.raises(ValueError, match="alpha must be finite"):
        cls.from_pretrained(str(tmp_path))


def test_lycoris_field_changed_after_construction_is_caught_by_validate():
    config = LoHaConfig(target_modules=["up"])
    config.alpha = NAN
    with pytest.raises(ValueError, match="alpha must be finite"):
        config.validate()


def _xlora_dir(tmp_path, text: str):
    (tmp_path / "adapter_config.json").write_text(text)
    return str(tmp_path)


def test_xlora_from_pretrained_reads_through_the_shared_reader(tmp_path):
    good = XLoraConfig(hidden_size=8, adapters={"0": "/a", "1": "/b"}, softmax_temperature=0.5)
    good.save_pretrained(str(tmp_path))
    assert XLoraConfig.from_pretrained(str(tmp_path)) == good
    assert XLoraConfig.from_pretrained(str(tmp_path / "adapter_config.json")) == good  # the file itself
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        XLoraConfig.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        XLoraConfig.from_pretrained(_xlora_dir(tmp_path, "{not json"))
    with pytest.raises(ValueError, match=r"adapter_config\.json must hold a JSON object, got list"):
        XLoraConfig.from_pretrained(_xlora_dir(tmp_path, "[1, 2]"))
    (tmp_path / "adapter_config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not UTF-8"):
        XLoraConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="softmax_temperature must be finite"):
        XLoraConfig.from_pretrained(_xlora_dir(tmp_path, json.dumps(
            {**good.to_dict(), "softmax_temperature": NAN})))


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules="(q|v"), r"target_modules: invalid regular expression"),
    (dict(target_modules=["q", 1]), "target_modules must be"),
    (dict(exclude_modules=5), "exclude_modules must be"),
    (dict(modules_to_save="head"), "modules_to_save must be a list"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform must be"),
    (dict(rank_pattern={"[a": 2}), "rank_pattern key: invalid regular expression"),
    (dict(layers_pattern=["layers"]), "layers_pattern is only used together with layers_to_transform"),
])
def test_lycoris_targeting_is_checked_like_lora(cls, kwargs, message):
    # One targeting check (AdapterConfigFile.validate_targeting) for every config class that targets modules.
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cls", sorted(BASE, key=lambda c: c.__name__), ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, message", [
    (dict(inference_mode="yes"), "inference_mode must be a bool"),
    (dict(task_type=7), "task_type must be a string or None, got int 7"),
    (dict(base_model_name_or_path=["m"]), "base_model_name_or_path must be a string or None"),
    (dict(revision=1.0), "revision must be a string or None"),
])
def test_peft_bookkeeping_fields_are_checked_by_every_config(cls, kwargs, message):
    # PeftConfigFields: the fields and their check are declared once for every config class.
    with pytest.raises(ValueError, match=message):
        cls(**BASE[cls], **kwargs)
    assert cls(**BASE[cls], task_type="CAUSAL_LM", inference_mode=True).inference_mode is True


@pytest.mark.parametrize("cls", list(BASE))
def test_positional_arguments_are_each_configs_own_leading_fields(cls):
    """The shared bookkeeping fields are keyword-only: a config's first positional argument is still its own
    first field (r, or X-LoRA's hidden_size), as before they moved to ``PeftConfigFields``."""
    first = "hidden_size" if cls is XLoraConfig else "r"
    kwargs = {k: v for k, v in BASE[cls].items() if k != first}
    config = cls(16, **kwargs)
    assert getattr(config, first) == 16
    assert {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"} <= set(config.to_dict())
