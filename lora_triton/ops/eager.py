"""When an op may skip its torch.library custom op and run as a plain ``torch.autograd.Function``.

A custom op costs tens of microseconds per call in eager mode (schema parsing of the arguments,
the autograd wrapper's pytree flattening, the dispatcher's redispatch to the backend kernel, and
torch._dynamo's disable wrapper around the implementation). On a small layer (a tiny Llama's M=64,
K=N=256) that is as much as the layer's arithmetic. The custom op exists for tracing: torch.compile,
torch.export, fake tensors, functorch transforms and dispatch modes must see one opaque op. A plain
eager call with plain tensors needs none of that, so it runs the very same implementation function
(same kernels or reference, same arguments) through an ``autograd.Function``: the results are the
same bits, only the wrapper differs.

Anything that is not such a plain eager call keeps the custom op, unchanged: compiling or exporting,
any torch function or dispatch mode (FakeTensorMode, the tests' op counters, ``with torch.device``),
functorch transforms (vmap, grad), autocast, and tensor subclasses (DTensor, FakeTensor, FSDP's flat
parameters). ``LORA_TRITON_EAGER=0`` sends every call through the custom ops.
"""

from __future__ import annotations

import functools

import torch

from ..env_vars import env

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ENV = "LORA_TRITON_EAGER"


def enabled() -> bool:
    """``LORA_TRITON_EAGER`` (default 1): 1 / true / on / yes (or empty) allow the fast path, 0 / false / off /
    no route every call through the custom ops; another value is an error naming these."""
    return _parse(env(_ENV, "1"))


@functools.lru_cache(maxsize=16)
def _parse(raw: str) -> bool:
    # Cached on the raw string: every eager op call asks (a bad value is not cached: it raises each time).
    value = raw.strip().lower()
    if value in ("", "1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{_ENV} must be one of 1, true, on, yes, 0, false, off, no; got {raw!r}")


def fast_path(x: torch.Tensor, *tensors) -> bool:
    """True when the op on x (and ``tensors``, None allowed) may run as a plain autograd.Function."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack() or torch._C._are_functorch_transforms_active()):
        return False
    if type(x) not in _PLAIN or torch.is_autocast_enabled(x.device.type):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return enabled()
