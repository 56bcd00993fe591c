"""tools/bias_experiment.py's run configs are byte for byte those recorded in
tests/data/bias_experiment_run_configs.json (written by the code of commit dc30aef, the repository path as
<REPO>), so that a shared config builder cannot change what the experiment runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tools import bias_experiment as bx

RECORDED = Path(__file__).parent / "data" / "bias_experiment_run_configs.json"


def bias_experiment_configs(profile_name: str) -> dict:
    """Every config the experiment writes for seed 0 of a profile: stage 1, the step-0 evaluations, each cell's
    stage 2 (a matched cell at weight x 1.2345) and the strength configs; as YAML text."""
    p = bx.PROFILES[profile_name]
    data, runs = Path("DATA"), Path("RUNS")
    out = {}

    def put(name, cfg):
        out[f"{profile_name}/{name}"] = yaml.safe_dump(cfg, sort_keys=False).replace(str(bx.REPO), "<REPO>")
    put("stage1_seed0", bx.run_config(p, data, runs / "stage1_seed0", None))
    for ratio in (0.3, 0.8):
        put(f"dset_step0_r{ratio}_seed0", bx.run_config(p, data, runs / f"dset_step0_r{ratio}_seed0",
                                                        bx.Cell("patch", ratio)))
    seen = set()
    for seed, cell, epochs in bx.plan(p):
        if seed != p.seeds[0]:
            continue
        weight = cell.weight * 1.2345 if cell.matched else cell.weight
        put(f"{cell.name}_seed0", bx.run_config(p, data, runs / f"{cell.name}_seed0", cell, epochs=epochs,
                                                weight=weight if cell.dset else None))
        for c in ([cell, cell.reference] if cell.dset else []):
            if c not in seen:
                seen.add(c)
                put(f"strength_seed0/{c.name}", bx.run_config(p, data, runs / "strength_seed0", c, weight=1.0))
    return out


@pytest.mark.parametrize("profile", ["cpu", "smoke"])
def test_bias_experiment_writes_the_same_config_bytes_as_before_the_builder(profile):
    recorded = {k: v for k, v in json.loads(RECORDED.read_text()).items() if k.startswith(profile + "/")}
    now = bias_experiment_configs(profile)
    assert sorted(now) == sorted(recorded) and len(now) >= 13
    for name, text in recorded.items():
        assert now[name] == text, name
