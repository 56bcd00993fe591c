"""Run configs built by the tools and benchmarks: one repository config (``configs/<base>``) with overrides.

The one way bench/ and tools/ make a config, as a user's own file would: a written file that includes
``configs/<base>`` and sets the overridden keys (for train.py runs), or the same, loaded in-process.

    cfg = run_config("dset4_r18_synth_cpu.yaml", {"epochs": 2, "dset": {"keep_ratio": 0.5}})
    write_run_config(cfg, "output/x/config.yaml")                    # train.py -c output/x/config.yaml
    load_run_config("dset4_r18_ratio0.3.yaml", {"input_size": [320, 320]}, ["dset.enabled=false"])

Overrides are nested dicts or ``-u`` strings (``"a.b=value"``, value parsed as YAML), merged left to right:
nested dicts key by key (a later value wins, keys keep their first position), anything else replaced whole.
The including file wins over ``configs/<base>`` in the same way (``__include__``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence, Union

import yaml

from src.core.config import YAMLConfig
from src.core.yaml_utils import ConfigError, parse_overrides

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
Overrides = Union[Mapping, Sequence[str]]


def config_path(base: str) -> Path:
    """``configs/<base>`` of this repository, whatever the working directory."""
    path = CONFIG_DIR / base
    if not path.is_file():
        known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {base!r} in {CONFIG_DIR}; give one of: {', '.join(known)}")
    return path


def _merge_into(out: dict, override: Mapping) -> dict:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            _merge_into(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_overrides(*overrides: Overrides) -> dict:
    """One nested dict from nested dicts and ``-u`` string lists, merged left to right (see the module doc)."""
    out: dict = {}
    for override in overrides:
        _merge_into(out, override if isinstance(override, Mapping) else parse_overrides(list(override)))
    return out


def run_config(base: str, *overrides: Overrides) -> dict:
    """``{"__include__": [configs/<base>], **merged overrides}``: a config file's content (absolute include)."""
    return {"__include__": [str(config_path(base))], **merge_overrides(*overrides)}


def write_run_config(cfg: dict, path) -> Path:
    """Write ``cfg`` as YAML (keys in their order) to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def load_run_config(base: str, *overrides: Overrides) -> YAMLConfig:
    """The validated YAMLConfig of ``configs/<base>`` with the overrides, without writing a file."""
    return YAMLConfig(str(config_path(base)), overrides=merge_overrides(*overrides))
