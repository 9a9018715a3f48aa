"""Serving many adapters over one base model: per-sequence mixed batches and a slot pool."""

from .batch import adapter_batch, loaded_adapters, mixed_batch_check
from .pool import AdapterPool

__all__ = ["AdapterPool", "adapter_batch", "loaded_adapters", "mixed_batch_check"]
