"""Every adapter save writes base_model_name_or_path by one rule (``io.peft_format.saved_base_model_name``),
the one PEFT's files show: the model's name, else the config's own value, else null. Compared with the real
PEFT (0.21.2) for LoRA and AdaLoRA."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
from models import tiny_llama, tiny_mlp

import lora_triton as lt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ADALORA = dict(init_r=3, target_r=1, tinit=0, tfinal=1, total_step=4)


def _named_llama(name):
    model = tiny_llama()
    if name is not None:  # what from_pretrained sets
        model.name_or_path = model.config._name_or_path = name
    return model


def _written(directory) -> object:
    return json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]


def _peft_writes(tmp_path, model, config) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when get_peft_model renames the config's value
        pm = peft.get_peft_model(model, config)
    pm.save_pretrained(str(tmp_path / "peft"))
    return _written(tmp_path / "peft")


def _ours_write(tmp_path, model, config, name="ours") -> object:
    (lt.inject_adalora if isinstance(config, lt.AdaLoraConfig) else lt.inject_lora)(model, config)
    lt.save_adapter(model, str(tmp_path / name))
    return _written(tmp_path / name)


@pytest.mark.parametrize("model_name", ["tiny/llama", None])
@pytest.mark.parametrize("adalora", [False, True], ids=["lora", "adalora"])
def test_injected_adapter_saves_the_model_name_like_peft(tmp_path, model_name, adalora):
    kw = dict(target_modules=["q_proj"], r=2)
    if adalora:
        kw.update(ADALORA)
    theirs = _peft_writes(tmp_path, _named_llama(model_name),
                          (peft.AdaLoraConfig if adalora else peft.LoraConfig)(**kw))
    ours = _ours_write(tmp_path, _named_llama(model_name), (lt.AdaLoraConfig if adalora else lt.LoraConfig)(**kw))
    assert ours == theirs == model_name


def test_loaded_adapter_keeps_its_files_name_like_peft(tmp_path):
    pm = peft.get_peft_model(_named_llama("tiny/llama"), peft.LoraConfig(target_modules=["q_proj"], r=2))
    pm.save_pretrained(str(tmp_path / "src"))
    reloaded = peft.PeftModel.from_pretrained(_named_llama(None), str(tmp_path / "src"))
    reloaded.save_pretrained(str(tmp_path / "peft"))
    model = _named_llama(None)
    lt.load_adapter(model, str(tmp_path / "src"))
    lt.save_adapter(model, str(tmp_path / "ours"))
    assert _written(tmp_path / "ours") == _written(tmp_path / "peft") == "tiny/llama"


@pytest.mark.parametrize("adalora", [False, True], ids=["lora", "adalora"])
def test_plain_module_saves_the_configs_name(tmp_path, adalora):
    # No transformers config to name the model: the config's own value is written, for AdaLoRA as for LoRA.
    kw = dict(target_modules=["up"], r=2, base_model_name_or_path="my/base")
    config = lt.AdaLoraConfig(**kw, **ADALORA) if adalora else lt.LoraConfig(**kw)
    assert _ours_write(tmp_path, tiny_mlp(), config) == "my/base"
    config = lt.AdaLoraConfig(target_modules=["up"], **ADALORA) if adalora else lt.LoraConfig(target_modules=["up"])
    assert _ours_write(tmp_path, tiny_mlp(), config, "unnamed") is None
