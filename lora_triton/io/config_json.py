"""Reading adapter_config.json: the one reader every config class (LoRA, LyCORIS, AdaLoRA, X-LoRA) and the
save / load code use, so a missing, non-UTF-8 or non-JSON file is the same clear error everywhere."""

from __future__ import annotations

import json
import os

CONFIG_NAME = "adapter_config.json"


def load_config_json(directory: str) -> dict:
    """The adapter_config.json dict of an adapter folder (or the file itself): FileNotFoundError when there is
    none, ``read_config_json``'s ValueError when it is not a UTF-8 JSON object."""
    path = os.path.join(directory, CONFIG_NAME) if os.path.isdir(directory) else directory
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
    return read_config_json(path)


def read_config_json(path: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not UTF-8 JSON holding an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (a JSON file was expected): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
