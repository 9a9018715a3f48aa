"""Functional ops and the backend choice; see ``backend.py``."""

from .backend import choose_backend
from .lora_linear import lora_linear
from .multi_lora import multi_lora_linear

__all__ = ["choose_backend", "lora_linear", "multi_lora_linear"]
