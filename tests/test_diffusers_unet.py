"""A tiny diffusers UNet2DConditionModel (built from a config, no download): LoRA with the module names
diffusion trainers use, trained a few steps, saved in PEFT's format, loaded through diffusers' own LoRA
loader and through lora_triton; LoRA / LoHa / LoKr adapters made by PEFT on the UNet load here."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from kinds_models import call, max_diff, peft_both_ways, train_steps
from safetensors.torch import load_file

import lora_triton as lt
from lora_triton.nn.lora_conv import LoraConv

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle for the UNet LoRA path")
peft = pytest.importorskip("peft", reason="diffusers loads LoRA through PEFT")

# The names diffusion LoRA trainers target: attention projections, resnet convs, transformer in/out, ff.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]


def tiny_unet():
    return copy.deepcopy(_tiny_unet())


@functools.lru_cache(maxsize=1)
def _tiny_unet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    return unet.eval()


def unet_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 500]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}


def test_unet_lora_loads_through_diffusers_and_lora_triton(tmp_path):
    unet = tiny_unet()
    lt.inject_lora(unet, lt.LoraConfig(target_modules=UNET_TARGETS, r=4, lora_alpha=8))
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, LoraConv)
    inputs = unet_inputs()
    base_out = call(tiny_unet(), inputs)
    train_steps(unet, inputs, steps=3, lr=0.5)
    ours = call(unet, inputs)
    assert max_diff(ours, base_out) > 1e-4  # trained: B moved away from zero
    lt.save_adapter(unet, str(tmp_path))

    # diffusers' own loader (PEFT underneath): the PEFT-keyed state dict and our config as its metadata.
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(tmp_path / "adapter_model.safetensors"))
             .items()}
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    metadata = {k: saved[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                                      "use_rslora", "lora_dropout", "bias")}
    theirs = tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_lora_adapter(state, prefix=None, adapter_name="style", metadata=metadata)
    assert max_diff(call(theirs, inputs), ours) <= 1e-5

    back = lt.load_adapter(tiny_unet(), str(tmp_path))
    assert max_diff(call(back, inputs), ours) <= 1e-5


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_unet_adapters_load_here(kind, tmp_path):
    # PEFT's LoRA on these layer types is covered by test_lora_conv / test_lora_embedding; the UNet run is slow.
    targets = ["to_q", "to_out.0", "conv1", "proj_in", "ff.net.2"]
    config = {"loha": lambda: peft.LoHaConfig(target_modules=targets, r=2, alpha=4, init_weights=False),
              "lokr": lambda: peft.LoKrConfig(target_modules=targets, r=2, alpha=4, init_weights=False)}[kind]()
    peft_both_ways(tiny_unet, unet_inputs(), config, tmp_path, lr=0.2)
