"""Atomic writes: a temporary file in the target's folder, fsynced, then renamed into place.

An interrupted save leaves the previous file whole; nothing a user saved is half-overwritten.
Temporary files are named ``.<target name>.<random>.tmp`` (``temp_files`` finds them) and are
created with the mode an ordinary new file gets under the user's umask (0644 with umask 022),
as PEFT's plain ``open(..., "w")`` does, not mkstemp's 0600.

``write_files`` writes several files as one save: every file is written and fsynced to its
temporary first, then they are renamed in the given order. The first rename is the commit point;
a crash after it leaves the not-yet-renamed temporaries in place, so the format (``peft_format``)
can tell a torn save from a hand edit and complete it.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Sequence
from contextlib import contextmanager


def _tmp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")


def _create_tmp(path: str) -> tuple[str, int]:
    """A new empty temporary and the mode it got: 0o666 narrowed by the umask (read without os.umask's race)."""
    while True:
        tmp = _tmp_name(path)
        try:  # O_EXCL: never another writer's file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp, stat.S_IMODE(os.stat(tmp).st_mode)
        except FileExistsError:
            continue


def _finish(tmp: str, mode: int) -> None:
    """Writers may replace the file (safetensors does, with 0600): give it back the umask mode, fsync it."""
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def temp_files(folder: str, name: str) -> list[str]:
    """Temporaries that saves of ``folder/name`` left behind (killed before they could remove them)."""
    prefix = f".{name}."
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(folder, e) for e in entries if e.startswith(prefix) and e.endswith(".tmp"))


def _fsync_dir(folder: str) -> None:
    """Make the renames durable too (a power cut after rename must not bring the old file back)."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows: directories cannot be opened for fsync
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(items: Sequence[tuple[str, Callable[[str], None]]]) -> None:
    """Write ``[(path, writer)]`` as one save: ``writer(tmp)`` fills each temporary, then renames in order.

    An exception before the first rename removes every temporary and leaves all targets as they
    were; after it, the remaining temporaries are kept (they mark the save as torn) and it propagates.
    """
    temps: list[str] = []
    committed = False
    try:
        for path, writer in items:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp, mode = _create_tmp(path)
            temps.append(tmp)
            writer(tmp)
            _finish(tmp, mode)
        for (path, _), tmp in zip(items, temps):
            os.replace(tmp, path)
            committed = True
        _fsync_dir(os.path.dirname(os.path.abspath(items[0][0])))
    finally:
        if not committed:
            for tmp in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, mode = _create_tmp(path)
    try:
        yield tmp
        _finish(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
