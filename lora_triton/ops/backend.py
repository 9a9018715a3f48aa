"""The one place that decides which implementation runs an op.

CUDA tensors go to the Triton kernels when triton imports; everything else runs the
pure-PyTorch reference. ``LORA_TRITON_BACKEND=triton|reference|auto`` overrides;
with ``TRITON_INTERPRET=1`` and ``LORA_TRITON_BACKEND=triton`` the kernels run on CPU
tensors through Triton's interpreter (how CI tests them). Within the Triton backend,
``LORA_TRITON_PATH=fused|composed|auto`` picks how a training linear runs (``requested_path``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from ..env_vars import env, env_choice

BACKENDS = ("auto", "triton", "reference")
# How the Triton backend runs a training linear: "fused" (our GEMMs with the LoRA term inside),
# "composed" (base GEMM on cuBLAS via torch.addmm, the LoRA term through our side kernels), or
# "auto" (per shape bucket and dtype, whichever a short on-device measurement finds faster;
# kernels/path_choice.py).
PATHS = ("auto", "fused", "composed")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton is installed; never imports it here (import must stay cheap)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return env("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str:
    """``LORA_TRITON_BACKEND`` (default auto); an unknown value is an error naming the valid ones."""
    return env_choice("LORA_TRITON_BACKEND", BACKENDS)


def requested_path() -> str:
    """``LORA_TRITON_PATH`` (default auto); an unknown value is an error naming the valid ones."""
    return env_choice("LORA_TRITON_PATH", PATHS)


def choose_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors living on ``device``."""
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    runnable = triton_available() and (device.type == "cuda" or interpreter_enabled())
    if requested == "triton":
        if not runnable:
            raise RuntimeError(
                "LORA_TRITON_BACKEND=triton but the Triton kernels cannot run on "
                f"{device.type} tensors (triton installed: {triton_available()}, "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}); "
                "use CUDA tensors, set TRITON_INTERPRET=1, or LORA_TRITON_BACKEND=reference"
            )
        return "triton"
    return "triton" if runnable and device.type == "cuda" else "reference"


_modules: dict[tuple[str, str], object] = {}  # (package, family) -> the imported implementation module


def implementation(device: torch.device, family: str):
    """The module running op ``family`` on ``device``: ``kernels/<family>.py`` (Triton) or its twin
    ``reference/<family>.py`` (same function names and signatures), imported on first use."""
    package = "kernels" if choose_backend(device) == "triton" else "reference"
    module = _modules.get((package, family))
    if module is None:  # imported on first use, then a dict lookup instead of the import machinery
        module = _modules[(package, family)] = importlib.import_module(f"lora_triton.{package}.{family}")
    return module
