"""ops.backend.env: the backend choice's env reads follow os.environ exactly (set, changed, unset)."""

from __future__ import annotations

import os

import pytest
import torch

from lora_triton.ops import backend


@pytest.mark.parametrize("value", ["reference", "", " Triton ", "caf\u00e9"])
def test_env_follows_os_environ(monkeypatch, value):
    name = "LORA_TRITON_TEST_ENV_VAR"
    monkeypatch.delenv(name, raising=False)
    assert backend.env(name, "dflt") == "dflt"
    monkeypatch.setenv(name, value)
    assert backend.env(name, "dflt") == os.environ.get(name) == value
    monkeypatch.setenv(name, value + "2")
    assert backend.env(name, "dflt") == value + "2"
    monkeypatch.delenv(name)
    assert backend.env(name, "dflt") == "dflt"


def test_backend_choice_follows_each_change(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    assert backend.choose_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("LORA_TRITON_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_TRITON_BACKEND"):
        backend.choose_backend(torch.device("cpu"))
    monkeypatch.setenv("LORA_TRITON_BACKEND", "auto")
    assert backend.choose_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpreter_enabled()


def test_env_without_a_backing_dict_falls_back_to_get(monkeypatch):
    """An os.environ replaced by a plain mapping (no ``_data``): env is its ``get``."""
    monkeypatch.setattr(os, "environ", {"LORA_TRITON_TEST_ENV_VAR": "set"})
    assert backend.env("LORA_TRITON_TEST_ENV_VAR", "dflt") == "set"
    assert backend.env("LORA_TRITON_TEST_ENV_UNSET", "dflt") == "dflt"


@pytest.mark.parametrize("name,read,choices", [
    ("LORA_TRITON_BACKEND", backend.requested_backend, backend.BACKENDS),
    ("LORA_TRITON_PATH", backend.requested_path, backend.PATHS),
    ("LORA_TRITON_GROUP", None, ("auto", "on", "off")),
])
def test_switches_share_one_parse(monkeypatch, name, read, choices):
    """The switches read through ``env_vars.env_choice``: unset or empty is the default, case and spaces are
    ignored, and a bad value is an error naming the valid ones, raised again on every read."""
    if read is None:
        from lora_triton.nn.grouping import grouping_policy as read
    monkeypatch.delenv(name, raising=False)
    assert read() == "auto"
    monkeypatch.setenv(name, "")
    assert read() == "auto"
    monkeypatch.setenv(name, f" {choices[-1].upper()} ")
    assert read() == choices[-1]
    monkeypatch.setenv(name, "Bogus")
    for _ in range(2):
        with pytest.raises(ValueError) as err:
            read()
        assert str(err.value) == f"{name} must be one of {choices}, got 'bogus'"
