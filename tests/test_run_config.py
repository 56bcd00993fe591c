"""src/core/run_config.py, the tools' one config builder, and the synthetic-set helpers beside it: the bias
experiment's run configs are byte for byte those of the code before the builder (recorded in
tests/data/bias_experiment_run_configs.json at commit dc30aef, repository path written as <REPO>), overrides
merge key by key, and a set on disk is not rendered again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from src.core import ConfigError, YAMLConfig
from src.core.run_config import (CONFIG_DIR, config_path, load_run_config, merge_overrides, run_config,
                                 write_run_config)
from src.data.synthetic_roadside import ensure_dataset, loader_config
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


def test_a_run_config_includes_the_repository_config_and_its_overrides_win(tmp_path):
    cfg = run_config("dset4_r18_synth_cpu.yaml", {"epochs": 2, "dset": {"keep_ratio": 0.5}}, ["dset.min_patches=1"])
    assert cfg == {"__include__": [str(CONFIG_DIR / "dset4_r18_synth_cpu.yaml")], "epochs": 2,
                   "dset": {"keep_ratio": 0.5, "min_patches": 1}}
    loaded = load_run_config("dset4_r18_synth_cpu.yaml", {"epochs": 2, "dset": {"keep_ratio": 0.5}},
                             ["dset.min_patches=1"])
    written = YAMLConfig(str(write_run_config(cfg, tmp_path / "sub" / "run.yaml")))  # the same, through a file
    for c in (loaded, written):
        assert c["epochs"] == 2 and c.dset.pruner.keep_ratio == 0.5 and c.dset.pruner.min_patches == 1
        assert c.dset.pruner.patch_size == 2 and c["input_size"] == [288, 512]  # the rest from the base


def test_overrides_merge_nested_keys_in_place_and_replace_lists_whole():
    merged = merge_overrides({"a": {"x": 1, "y": [1, 2]}, "b": 0}, {"a": {"y": [3], "z": 2}}, ["a.x=5", "c=[1, 2]"])
    assert merged == {"a": {"x": 5, "y": [3], "z": 2}, "b": 0, "c": [1, 2]}
    assert list(merged["a"]) == ["x", "y", "z"]  # first positions kept: the written YAML keeps its order
    source = {"a": {"x": [1]}}
    merge_overrides(source)["a"]["x"].append(2)
    assert source == {"a": {"x": [1]}}  # the inputs are copied, never changed


def test_an_unknown_base_config_is_an_error_naming_the_folder_and_the_configs():
    with pytest.raises(ConfigError, match=r"no config 'nope.yaml' in .*configs; give one of: .*dset4_r18_synth_cpu"):
        config_path("nope.yaml")


def test_the_synthetic_set_is_rendered_once_and_its_loader_sections_point_into_it(tmp_path):
    messages = []
    splits = ensure_dataset(str(tmp_path / "set"), num_train=2, num_val=1, width=96, height=64, min_objects=1,
                            max_objects=3, log=messages.append, statistics=True)
    assert [len(splits[s]["images"]) for s in ("train", "val")] == [2, 1]
    assert messages[0] == f"generating 2 train / 1 val images (96x64) in {tmp_path / 'set'}" and len(messages) == 3
    val_json = tmp_path / "set" / "annotations" / "instances_val.json"
    stamp = val_json.stat().st_mtime_ns
    assert ensure_dataset(str(tmp_path / "set"), num_train=2, num_val=1, width=96, height=64) is None
    assert val_json.stat().st_mtime_ns == stamp
    train = loader_config(tmp_path / "set", "train", 4, 0)
    assert train["dataset"]["ann_file"] == str(tmp_path / "set" / "annotations" / "instances_train.json")
    assert [op["type"] for op in train["dataset"]["transforms"]["ops"]] == [
        "RandomPhotometricDistort", "RandomHorizontalFlip", "Resize", "ConvertPILImage"]
    assert [op["type"] for op in loader_config(tmp_path / "set", "val", 8, 0)["dataset"]["transforms"]["ops"]] == [
        "Resize", "ConvertPILImage"]


def test_bench_and_tools_write_no_config_and_render_no_data_set_of_their_own():
    """Configs through src/core/run_config.py, synthetic sets through ensure_dataset; the one exception is the
    generator's own command line (tools/make_synthetic_roadside.py renders whenever it is asked)."""
    root = Path(__file__).resolve().parents[1]
    files = [p for folder in ("bench", "tools") for p in (root / folder).glob("*.py")
             if p.name != "make_synthetic_roadside.py"]
    found = [f"{p.relative_to(root)}: {needle}" for p in files for needle in ("__include__", "generate_dataset(",
                                                                             "safe_dump(") if needle in p.read_text()]
    assert len(files) >= 10
    assert found == []
