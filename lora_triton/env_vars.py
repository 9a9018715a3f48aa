"""Environment reads on hot paths: ``env(name, default)`` is ``os.environ.get`` from os.environ's backing dict;
``env_choice(name, choices)`` reads a switch such as ``LORA_TRITON_BACKEND`` through it.

Every op call asks for its backend and each CPU thread toggle for its policy; with caches cold after a large
GEMM (each decode step) the Mapping machinery of ``os.environ.get`` cost 20-30 us per variable against ~7 us
here (measured, 2026-12-01). It reads what ``os.environ`` holds (set, changed or deleted through it, as
monkeypatch and ``patch.dict`` do); like ``os.environ.get`` it does not see a raw ``os.putenv``. Lives outside
``ops`` so ``reference`` can use it without importing the ops package.
"""

from __future__ import annotations

import functools
import os


def env(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` read from os.environ's backing dict (one lookup) where it has one."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    raw = data.get(key)
    return default if raw is None else os.environ.decodevalue(raw)


_ENV_KEYS: dict[str, object] = {}


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """``name``'s value stripped and lower-cased, one of ``choices`` (unset or empty: ``choices[0]``, the
    default); another value is an error naming them. The parse is cached per raw value (every op call asks);
    a bad value is not cached: it raises on every call."""
    return _choice(name, env(name, choices[0]), choices)


@functools.lru_cache(maxsize=64)
def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
