"""Saving adapters from a torch.distributed run (DDP replicas or FSDP2-sharded parameters).

DDP: every rank holds the whole adapter; rank 0 writes it (``save_adapter`` on ``ddp.module``).
FSDP2 (``fully_shard``): parameters are DTensor shards; ``gather_adapter`` is a collective -- every rank
calls it -- that returns the full PEFT-keyed tensors, and ``save_adapter_distributed`` writes them from
rank 0 only. The dropout-seed rule per rank lives in ``ops/seeds.py``; docs/distributed.md has the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from .io.hf_integration import _internal_keys
from .io.peft_format import PREFIX, _bias_params, save_adapter
from .nn.inject import adapter_configs


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # DTensor (FSDP2): all-gather the shards
    return (full_tensor() if callable(full_tensor) else t).detach().to("cpu").contiguous()


def gather_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-keyed full tensors of one adapter; with FSDP2 shards a collective that every rank must call."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    out = {}
    for peft_key, internal in sorted(_internal_keys(model, adapter_name).items()):
        if internal in state:
            out[peft_key] = _full(state[internal])
    for key, value in sorted(_bias_params(model, adapter_configs(model)[adapter_name], adapter_name).items()):
        out[f"{PREFIX}{key}"] = _full(value)
    return out


def save_adapter_distributed(model: nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Every rank calls it; the adapter is gathered (FSDP2) and rank 0 writes it in PEFT's format."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    tensors = gather_adapter(model, adapter_name)
    if not initialized or dist.get_rank() == 0:
        save_adapter(model, directory, adapter_name, tensors=tensors)
    if initialized:
        dist.barrier()
