"""Issue 8, saving: the config + weights pair is one atomic save (a save killed at any point loads
as the old or the new adapter, never a mix), killed saves leave no temporary behind the next save,
and the files get the mode an ordinary file gets under the user's umask."""

from __future__ import annotations

import os
import random
import signal
import stat
import time

import pytest
import torch
from models import model_input, randomize_lora, run, tiny_mlp

import lora_triton
from lora_triton.io import atomic

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child at each step of a save")


def _adapter(seed: int, r: int, alpha: float):
    model = lora_triton.inject_lora(tiny_mlp(), lora_triton.LoraConfig(target_modules=["up", "down"], r=r,
                                                                       lora_alpha=alpha))
    randomize_lora(model, seed=seed)
    with torch.no_grad():
        out = run(model, model_input("mlp"))
    return model, out


def _loads_as(directory) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torn-save notice
        loaded = lora_triton.load_adapter(tiny_mlp(), str(directory))
    with torch.no_grad():
        return run(loaded, model_input("mlp"))


def _temps(directory) -> list[str]:
    return sorted(e for e in os.listdir(directory) if e.endswith(".tmp"))


_CALLS = ("open", "fsync", "replace", "unlink")


def _install_kill(at: int, counter: list) -> None:
    """In the child: SIGKILL itself just before the at-th file-system call of the save."""
    for name in _CALLS:
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            counter[0] += 1
            if counter[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(os, name, wrapped)


def _count_calls(model, directory) -> int:
    counter = [0]
    saved = {n: getattr(os, n) for n in _CALLS}
    try:
        _install_kill(-1, counter)
        lora_triton.save_adapter(model, str(directory))
    finally:
        for n, f in saved.items():
            setattr(os, n, f)
    return counter[0]


def _save_in_child(model, directory, at: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _install_kill(at, [0])
            lora_triton.save_adapter(model, str(directory))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("new_r, new_alpha", [(2, 3.0), (4, 5.0)])  # new rank; same rank, new alpha
def test_save_killed_at_every_step_loads_old_or_new(tmp_path, new_r, new_alpha):
    old_model, old_out = _adapter(seed=1, r=4, alpha=8.0)
    new_model, new_out = _adapter(seed=2, r=new_r, alpha=new_alpha)
    last_model, last_out = _adapter(seed=3, r=3, alpha=2.0)
    directory = tmp_path / "adapter"
    steps = _count_calls(new_model, tmp_path / "probe")
    assert steps > 4
    outcomes = set()
    for at in range(1, steps + 2):
        lora_triton.save_adapter(old_model, str(directory))
        status = _save_in_child(new_model, directory, at)
        got = _loads_as(directory)
        is_old, is_new = torch.equal(got, old_out), torch.equal(got, new_out)
        assert is_old or is_new, f"killed before call {at}: the directory loads as neither adapter"
        outcomes.add("old" if is_old else "new")
        assert os.WIFSIGNALED(status) or at > steps
        lora_triton.save_adapter(last_model, str(directory))  # the next save completes / cleans up
        assert _temps(directory) == [], f"killed before call {at}: temporaries survived the next save"
    assert torch.equal(_loads_as(directory), last_out)
    assert outcomes == {"old", "new"}


def test_save_killed_at_random_times_loads_old_or_new(tmp_path):
    models = [_adapter(seed=s, r=r, alpha=a) for s, r, a in ((1, 4, 8.0), (2, 2, 3.0), (5, 4, 5.0))]
    directory = tmp_path / "adapter"
    lora_triton.save_adapter(models[0][0], str(directory))
    rng = random.Random(0)
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child saves the three adapters in turn until killed
            try:
                for i in range(10**6):
                    lora_triton.save_adapter(models[i % 3][0], str(directory))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = _loads_as(directory)
        assert any(torch.equal(got, out) for _, out in models)
    lora_triton.save_adapter(models[1][0], str(directory))
    assert _temps(directory) == []
    assert torch.equal(_loads_as(directory), models[1][1])


def test_torn_pair_loads_as_the_new_adapter_and_next_save_completes(tmp_path, monkeypatch):
    old_model, _ = _adapter(seed=1, r=4, alpha=8.0)
    new_model, new_out = _adapter(seed=2, r=4, alpha=5.0)  # same rank: a mix would load, wrongly scaled
    directory = tmp_path / "adapter"
    lora_triton.save_adapter(old_model, str(directory))
    real = os.replace

    def config_rename_fails(src, dst):
        if str(dst).endswith(CONFIG):
            raise OSError("simulated crash after the weights were renamed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", config_rename_fails)
    with pytest.raises(OSError, match="simulated crash"):
        lora_triton.save_adapter(new_model, str(directory))
    monkeypatch.undo()
    assert len(_temps(directory)) == 1  # the new config's temporary marks the save as torn
    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = lora_triton.load_adapter(tiny_mlp(), str(directory))
    with torch.no_grad():
        assert torch.equal(run(loaded, model_input("mlp")), new_out)
    assert lora_triton.nn.adapter_configs(loaded)["default"].lora_alpha == 5.0


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    model, _ = _adapter(seed=1, r=2, alpha=2.0)
    directory = tmp_path / "adapter"
    directory.mkdir()
    for name in (f".{WEIGHTS}.dead01.tmp", f".{CONFIG}.dead02.tmp"):
        (directory / name).write_bytes(b"x" * 1000)
    (directory / "unrelated.tmp").write_text("not ours")
    lora_triton.save_adapter(model, str(directory))
    assert _temps(directory) == ["unrelated.tmp"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_mode(tmp_path, umask, mode):
    model, _ = _adapter(seed=1, r=2, alpha=2.0)
    old = os.umask(umask)
    try:
        lora_triton.save_adapter(model, str(tmp_path / "adapter"))
        lora_triton.LoraConfig(target_modules=["up"]).save_pretrained(str(tmp_path / "config_only"))
    finally:
        os.umask(old)
    for path in (tmp_path / "adapter" / CONFIG, tmp_path / "adapter" / WEIGHTS, tmp_path / "config_only" / CONFIG):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
