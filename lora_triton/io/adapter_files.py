"""The adapter file pair (``adapter_config.json`` + ``adapter_model.safetensors``) as one atomic save.

Two files cannot be renamed at once, so a save is made self-healing instead:

1. both files are written to temporaries and fsynced; the weights' safetensors metadata also holds
   the config text (``CONFIG_META``), so the weights say which config they belong to;
2. the weights are renamed into place: the commit point;
3. then the config.

A crash before 2 leaves the old pair (and temporaries). A crash between 2 and 3 leaves new weights,
the old config, and the new config's temporary: ``torn_config`` recognises exactly that (the weights'
recorded config differs from the file's and equals a leftover temporary), the loader then uses the
recorded config, so the directory loads as the new adapter, never as new weights under the old config.
A config edited by hand (no matching temporary) is used as it is, as PEFT would. Files PEFT wrote
carry no recorded config and load as before. Each save first completes a torn pair, then removes
the temporaries killed saves left behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Optional

from safetensors import safe_open

from .atomic import temp_files, write_files
from .config_json import CONFIG_NAME, read_config_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_META = "lora_triton.adapter_config"


def _recorded_config(weights: str) -> Optional[dict]:
    """The config recorded in the weights' metadata; None for files without one (PEFT's) or unreadable ones."""
    try:
        with safe_open(weights, "pt") as f:
            text = (f.metadata() or {}).get(CONFIG_META)
        data = json.loads(text) if text is not None else None
    except Exception:  # a corrupt file is reported by the tensor read, with its own clear error
        return None
    return data if isinstance(data, dict) else None


def _matching_temp(folder: str, recorded: dict) -> Optional[str]:
    for tmp in temp_files(folder, CONFIG_NAME):
        try:
            if read_config_json(tmp) == recorded:
                return tmp
        except (ValueError, OSError):
            continue  # a temporary killed while being written
    return None


def torn_config(folder: str) -> Optional[dict]:
    """The config the weights were saved with, when ``folder`` holds a torn save (steps 2 done, 3 not)."""
    weights = os.path.join(folder, WEIGHTS_NAME)
    recorded = _recorded_config(weights) if os.path.isfile(weights) else None
    if recorded is None:
        return None
    try:
        if read_config_json(os.path.join(folder, CONFIG_NAME)) == recorded:
            return None
    except (ValueError, OSError):
        pass  # missing or unreadable config: torn if a temporary proves it
    return recorded if _matching_temp(folder, recorded) is not None else None


def recover(folder: str) -> None:
    """Complete a torn save (rename its config temporary into place), then delete stale temporaries."""
    recorded = torn_config(folder)
    if recorded is not None:
        os.replace(_matching_temp(folder, recorded), os.path.join(folder, CONFIG_NAME))
    for tmp in temp_files(folder, WEIGHTS_NAME) + temp_files(folder, CONFIG_NAME):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def write_pair(folder: str, write_weights: Callable[[str, dict], None], config_text: str) -> None:
    """Save the pair: ``write_weights(tmp_path, metadata)`` writes the safetensors file."""
    os.makedirs(folder, exist_ok=True)
    recover(folder)

    def config_writer(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text)

    write_files([(os.path.join(folder, WEIGHTS_NAME),
                  lambda tmp: write_weights(tmp, {"format": "pt", CONFIG_META: config_text})),
                 (os.path.join(folder, CONFIG_NAME), config_writer)])
