"""YAML loading with ``__include__`` composition and ``-u a.b=value`` overrides.

Every leaf key remembers the file that set it (``origins``), so a validation error can name the file.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Tuple

import yaml

INCLUDE_KEY = "__include__"
Origins = Dict[Tuple[str, ...], str]


class ConfigError(ValueError):
    """A problem with a YAML config: the message names the file, the key and how to fix it."""


class DataError(ValueError):
    """A problem with a data file (annotation json, image, split file), not with the YAML config: the
    message names the file (and the image / annotation id) and how to fix it."""


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict, origins: Origins, source: str, prefix=()) -> dict:
    """Merge ``override`` into ``base`` in place (mappings merge recursively, everything else replaces)."""
    for key, value in override.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value, origins, source, path)
        else:
            base[key] = copy.deepcopy(value)
            for k in [k for k in origins if k[: len(path)] == path]:
                del origins[k]
            _record(value, path, origins, source)
    return base


def _record(value: Any, path: tuple, origins: Origins, source: str):
    origins[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, path + (k,), origins, source)


def load_yaml_config(path: str, _stack: List[str] | None = None) -> Tuple[dict, Origins]:
    """Load ``path`` with its includes (relative to the including file, recursive; the including file wins).

    Returns the merged mapping and the origin file of every key path.
    """
    path = os.path.abspath(path)
    stack = list(_stack or [])
    if path in stack:
        chain = " -> ".join(stack + [path])
        raise ConfigError(f"include cycle: {chain}")
    stack.append(path)
    data = _read_yaml(path)
    includes = data.pop(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY} must be a list of relative file paths, got {includes!r}")
    merged: dict = {}
    origins: Origins = {}
    for inc in includes:
        inc_path = os.path.join(os.path.dirname(path), inc)
        if not os.path.exists(inc_path):
            raise ConfigError(f"{path}: {INCLUDE_KEY} entry {inc!r} not found (looked for {inc_path})")
        sub, sub_origins = load_yaml_config(inc_path, stack)
        deep_merge(merged, sub, origins, inc_path)
        origins.update(sub_origins)
    deep_merge(merged, data, origins, path)
    return merged, origins


def parse_overrides(items: List[str] | None) -> dict:
    """``['a.b=1', 'c=[1, 2]']`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"-u override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"-u override {item!r}: value is not valid YAML: {e}") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"-u override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def get_path(cfg: dict, path: tuple, default=None):
    node = cfg
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node
