"""All-or-nothing changes to a model: snapshot its structure, roll back on any exception.

``inject_lora`` and ``load_adapter`` change a model in many small steps (wrap a module, add an
adapter to a table, copy weights, switch trainable flags); an exception half-way used to leave
orphan parameters behind and a retry then said "already exists". Inside ``model_transaction``
every step may fail: on exit by exception the model gets back exactly what it had.

What is snapshotted, generically (new layer types and adapter tables need nothing here):
every module's ``__dict__`` one level deep (its ``_modules`` / ``_parameters`` / ``_buffers``
tables, hooks, and plain attributes such as ``r``, ``scaling``, ``active_adapters`` and the
adapter configs; dicts, lists and sets are copied, so in-place edits of them roll back), and
every parameter's ``requires_grad``. Modules created inside the block are simply dropped.
Tensor *values* are not copied (a model may be large): writes into tensors that existed before
the block go through ``Transaction.write``, which keeps a copy of the old value first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading

import torch
from torch import nn


class Transaction:
    def __init__(self, model: nn.Module):
        # Tens of thousands of small copies would trigger full collections of a large heap (a 3001-module
        # snapshot took ~6x longer with the collector on); none of them can form a cycle.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._modules = [(m, {k: _copy(v) for k, v in m.__dict__.items()}) for m in model.modules()]
            self._grads = [(p, p.requires_grad) for p in model.parameters()]
        finally:
            if collecting:
                gc.enable()
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target.copy_(value)``, undone by a rollback."""
        with torch.no_grad():
            self._values.append((target, target.detach().clone()))
            target.copy_(value)

    def rollback(self) -> None:
        with torch.no_grad():
            for target, old in reversed(self._values):
                target.copy_(old)
        for module, state in self._modules:
            module.__dict__.clear()
            module.__dict__.update({k: _copy(v) for k, v in state.items()})
        for p, flag in self._grads:
            p.requires_grad_(flag)


def _copy(value):
    return value.copy() if isinstance(value, (dict, list, set)) else value  # C-level copies keep their type


_OPEN = threading.local()  # ids of the models with a transaction open in this thread


@contextlib.contextmanager
def model_transaction(model: nn.Module):
    """``with model_transaction(model) as tx: ...``: on an exception the model is restored, then it propagates."""
    tx = Transaction(model)
    open_ids = _OPEN.__dict__.setdefault("ids", set())
    nested = id(model) in open_ids
    open_ids.add(id(model))
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise
    finally:
        if not nested:
            open_ids.discard(id(model))


def transactional(fn):
    """Decorator for ``fn(model, ...)``: all of fn's changes to the model, or none."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module) or id(model) in _OPEN.__dict__.get("ids", ()):
            return fn(model, *args, **kwargs)  # fn's own check gives the clear error / the outer one rolls back
        with model_transaction(model):
            return fn(model, *args, **kwargs)
    return wrapper
