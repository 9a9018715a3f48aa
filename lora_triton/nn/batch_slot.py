"""The ``mixed_batch`` hook of a layer as a per-thread attribute.

``adapter_batch`` / ``AdapterPool.batch`` set every layer's hook for the duration of a block. As a
plain attribute the hook was seen by every thread, so a ``model(...)`` from another thread while a
batch was open silently ran that batch's adapters. Stored per thread, a forward in another thread
sees the model as it is outside any batch. With no batch open anywhere the getter is one empty-dict
test (no thread lookup), which ``torch.compile`` traces like a plain attribute.
"""

from __future__ import annotations

import threading

_KEY = "_mixed_batch_by_thread"


def _get(module):
    hooks = module.__dict__.get(_KEY)
    if not hooks:
        return None
    return hooks.get(threading.get_ident())


def _set(module, hook) -> None:
    hooks = module.__dict__.setdefault(_KEY, {})
    if hook is None:
        hooks.pop(threading.get_ident(), None)
    else:
        hooks[threading.get_ident()] = hook


def mixed_batch_slot() -> property:
    """A class attribute ``mixed_batch = mixed_batch_slot()``: the hook this thread set, else None."""
    return property(_get, _set, doc="the mixed-batch hook set by this thread (None: the layer's own forward)")
