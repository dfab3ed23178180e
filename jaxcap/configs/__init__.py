"""Configs: Python files whose ``get_config()`` returns an ``ml_collections.ConfigDict``.

A config is named (``shapes``, ``flickr8k``, ``coco``, ``tiny``: the files
beside this one) or given as a path to such a file, and overridden from the command line
with ``--config.KEY=VALUE`` (``--config.decoder.hidden_dim=256``). The config is
the single source of every number a run uses.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path

import ml_collections

from jaxcap.errors import UserError

BUILT_IN = ("shapes", "flickr8k", "coco", "tiny")


class ConfigError(UserError):
    """A config that cannot be loaded or overridden; the message says which key."""


def load(name_or_path: str) -> ml_collections.ConfigDict:
    if name_or_path in BUILT_IN:
        module = importlib.import_module(f"jaxcap.configs.{name_or_path}")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{name_or_path}: neither a built-in config {BUILT_IN} nor a file")
        spec = importlib.util.spec_from_file_location(f"jaxcap_user_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{name_or_path}: defines no get_config()")
    return module.get_config()


def _parse(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return os.path.expanduser(text) if text.startswith("~") else text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def override(config: ml_collections.ConfigDict, assignments: list[str]) -> ml_collections.ConfigDict:
    """Applies ``KEY=VALUE`` assignments (dotted keys), typed like the current value."""
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        if not equals:
            raise ConfigError(f"--config.{assignment}: expected --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: no such config key")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"--config.{key}: no such config key; known here: {sorted(node)}")
        try:
            value = _parse(text, node[leaf])
        except ValueError as error:
            raise ConfigError(f"--config.{key}={text}: {error}") from None
        with node.ignore_type():
            node[leaf] = value
    return config
