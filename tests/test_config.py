"""Config composition, overrides and validation errors (issue 'pipeline', 'reliability')."""
import dataclasses
import json
import os
import textwrap

import pytest
import torch

from src.core import ConfigError, YAMLConfig
from src.core.yaml_utils import load_yaml_config, parse_overrides
from src.zoo.rtdetr import cass
from src.zoo.rtdetr.dset_config import DSET_KEYS, validate_dset


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def test_include_is_recursive_relative_and_the_including_file_wins(tmp_path):
    write(tmp_path, "inc/base.yaml", """
        a: 1
        nested: {x: 1, y: 2}
        __include__: [deeper.yaml]
    """)
    write(tmp_path, "inc/deeper.yaml", "z: 9\na: 0\n")
    top = write(tmp_path, "top.yaml", """
        __include__: [inc/base.yaml]
        nested: {y: 20}
    """)
    cfg, origins = load_yaml_config(str(top))
    assert cfg == {"z": 9, "a": 1, "nested": {"x": 1, "y": 20}}
    assert origins[("nested", "y")].endswith("top.yaml")
    assert origins[("nested", "x")].endswith("base.yaml")
    assert origins[("z",)].endswith("deeper.yaml")


def test_include_cycle_is_an_error_showing_the_chain(tmp_path):
    write(tmp_path, "a.yaml", "__include__: [b.yaml]\n")
    write(tmp_path, "b.yaml", "__include__: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml_config(str(tmp_path / "a.yaml"))


def test_missing_include_names_the_including_file(tmp_path):
    top = write(tmp_path, "top.yaml", "__include__: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: __include__ entry 'nope\.yaml' not found"):
        load_yaml_config(str(top))


def test_overrides_are_parsed_as_yaml_into_nested_keys():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=true", "e.f.g=abc"]) == {
        "a": {"b": 3}, "c": [1, 2], "d": True, "e": {"f": {"g": "abc"}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_override_changes_the_built_model_config():
    cfg = YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml", overrides=["epochs=3", "HybridEncoder.nhead=4"])
    assert cfg["epochs"] == 3
    assert cfg["HybridEncoder"]["nhead"] == 4
    assert cfg.where(("epochs",)).startswith("command line")


def test_unknown_top_level_key_names_file_key_and_valid_keys(tmp_path):
    top = tmp_path / "bad.yaml"
    top.write_text("__include__: ['%s']\nepochss: 3\n" % _rel("configs/rtdetrv2_r18vd_coco.yaml", tmp_path))
    with pytest.raises(ConfigError) as e:
        YAMLConfig(str(top))
    msg = str(e.value)
    assert "bad.yaml" in msg and "'epochss'" in msg and "epochs" in msg


def test_misspelled_component_key_names_the_file_and_valid_keys(tmp_path):
    top = tmp_path / "bad.yaml"
    top.write_text("__include__: ['%s']\nHybridEncoder:\n  hiden_dim: 128\n"
                   % _rel("configs/rtdetrv2_r18vd_coco.yaml", tmp_path))
    with pytest.raises(ConfigError) as e:
        YAMLConfig(str(top))
    msg = str(e.value)
    assert "bad.yaml: HybridEncoder.hiden_dim" in msg and "hidden_dim" in msg


def test_misspelled_key_in_a_nested_transform_is_an_error():
    with pytest.raises(ConfigError) as e:
        YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml",
                   overrides={"val_dataloader": {"collate_fn": {"type": "BatchImageCollateFunction",
                                                                "scale": [[640, 640]]}}})
    assert "'scale'" in str(e.value) and "scales" in str(e.value)


def test_misspelled_dataloader_key_is_an_error():
    with pytest.raises(ConfigError, match=r"train_dataloader.batch_size.*total_batch_size"):
        YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml", overrides=["train_dataloader.batch_size=4"])


@pytest.mark.parametrize("key,value,fragment", [
    ("keep_ratio", 0.0, "in (0, 1]"),
    ("keep_ratio", 1.5, "in (0, 1]"),
    ("cass_loss_weight", -0.1, ">= 0"),
    ("cass_expansion_ratio", -1.0, ">= 0"),
    ("cass_normalization", "objects", "patch, object, object_area, area_patch, object_balanced"),
    ("cass_decay_type", "cosine", "gaussian, linear"),
    ("patch_size", 0, ">= 1"),
    ("keep_ratio", True, "in (0, 1]"),
])
def test_dset_out_of_range_values_name_the_key(key, value, fragment):
    with pytest.raises(ValueError) as e:
        validate_dset({key: value}, where="cfg.yaml: dset")
    assert f"cfg.yaml: dset.{key}" in str(e.value) and fragment in str(e.value)


def test_dset_top_k_larger_than_num_experts_is_an_error():
    with pytest.raises(ValueError, match="top_k = 5 is larger than .*num_experts = 4"):
        validate_dset({"num_experts": 4, "top_k": 5})
    with pytest.raises(ValueError, match="encoder_moe_top_k"):
        validate_dset({"encoder_moe_num_experts": 2, "encoder_moe_top_k": 3})


def test_dset_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        validate_dset({"keep_ratoi": 0.3})
    assert "keep_ratoi" in str(e.value) and "keep_ratio" in str(e.value)


def test_dset_defaults_are_filled_and_disabled_section_means_off():
    full = validate_dset({"keep_ratio": 0.5})
    assert set(full.values) == set(DSET_KEYS) and full.pruner.keep_ratio == 0.5 and full.values["keep_ratio"] == 0.5
    assert full.cass.target == cass.CASSConfig()  # every cass_* default is the CASSConfig default
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.pruner.keep_ratio = 0.9
    assert validate_dset({"enabled": False}) is None
    assert validate_dset(None) is None


def test_docs_list_every_dset_key_with_its_default():
    text = open("docs/dset.md").read()
    for name, key in DSET_KEYS.items():
        assert f"| `{name}` | `{key.default}` |" in text, name


@pytest.mark.parametrize("path", ["configs/dset4_r18_ratio0.3.yaml", "configs/dset4_r18_synth_cpu.yaml"])
def test_shipped_optimizer_groups_cover_every_parameter_once_without_decay_on_norms_and_biases(path):
    from src.optim.optimizer import build_optimizer, check_param_groups, params_with_unwanted_weight_decay

    cfg = YAMLConfig(path)
    model = cfg.model
    opt = build_optimizer(model, cfg["optimizer"])
    check_param_groups(model, opt)
    assert params_with_unwanted_weight_decay(model, opt) == []
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone"] == lrs["backbone_norm_bias"] == 1e-5 and lrs["default"] == 1e-4


def test_coco_config_follows_the_official_rtdetrv2_r18vd_120e_recipe():
    """rtdetrv2_r18vd_120e_coco.yml and its includes: one group rule (norm/bn without weight decay), every
    parameter at lr 1e-4 (backbone included), 120 epochs with the heavy augmentations off from 117, AMP, EMA."""
    from src.optim.optimizer import build_optimizer, check_param_groups

    cfg = YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml")
    model = cfg.model
    opt = build_optimizer(model, cfg["optimizer"])
    check_param_groups(model, opt)
    groups = {g["name"]: g for g in opt.param_groups}
    assert sorted(groups) == ["default", "norm"]
    assert all(g["lr"] == 1e-4 for g in groups.values())
    assert (groups["norm"]["weight_decay"], groups["default"]["weight_decay"]) == (0.0, 1e-4)
    norm_params = {id(p) for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))
                   for p in m.parameters(recurse=False)}
    assert {id(p) for p in groups["norm"]["params"]} == norm_params  # by module type, not by name
    backbone_conv = model.backbone.conv1.conv1_1.conv.weight
    assert any(p is backbone_conv for p in groups["default"]["params"])  # lr 1e-4, decayed
    assert cfg["epochs"] == 120 and cfg["use_amp"] is True and cfg.get("amp_dtype", "float16") == "float16"
    policy = cfg["train_dataloader"]["dataset"]["transforms"]["policy"]
    assert policy == {"name": "stop_epoch", "epoch": 117,
                      "ops": ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]}
    assert cfg["train_dataloader"]["collate_fn"]["scales"] is None
    assert cfg["train_dataloader"]["total_batch_size"] == 16 and cfg["clip_max_norm"] == 0.1
    assert cfg["ema"] == {"decay": 0.9999, "warmups": 2000} and cfg["use_ema"] is True
    assert cfg["lr_warmup_scheduler"]["warmup_duration"] == 2000


def test_dset_error_names_where_the_bad_value_was_set(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line \(-u\): dset\.keep_ratio = 2 is invalid"):
        YAMLConfig("configs/demo_cpu.yaml", overrides=["dset.keep_ratio=2"])
    bad = tmp_path / "bad_ratio.yaml"
    bad.write_text("__include__: ['%s']\ndset:\n  keep_ratio: 2\n" % _rel("configs/demo_cpu.yaml", tmp_path))
    with pytest.raises(ConfigError, match=r"bad_ratio\.yaml: dset\.keep_ratio = 2 is invalid"):
        YAMLConfig(str(bad))


def _rel(path, tmp_path):
    return os.path.relpath(os.path.abspath(path), str(tmp_path))


def test_readme_lists_every_top_level_dataloader_and_dataset_key():
    from src.core import registry
    from src.core.config import DATALOADER_KEYS, GLOBAL_KEYS
    from src.data.coco_dataset import CocoDetection

    text = open("README.md").read()
    assert "dset" in registry.sections()  # registered by the model side (src/zoo/rtdetr/dset_config.py)
    for key in (list(GLOBAL_KEYS) + list(registry.sections()) + list(DATALOADER_KEYS)
                + list(registry.constructor_params(CocoDetection))):
        assert f"| `{key}` |" in text, key


# ----------------------------------------------------------------------------- input_size (one key)
def _resize_sizes(cfg):
    from src.core.input_size import resize_ops
    return [op["size"] for _, op in resize_ops(cfg.yaml_cfg)]


def test_input_size_sets_both_resize_ops_and_eval_spatial_size():
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[160, 256]"])
    assert cfg["eval_spatial_size"] == [160, 256]
    assert _resize_sizes(cfg) == [[160, 256], [160, 256]]  # train and val
    ref = YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml")
    assert ref["eval_spatial_size"] == [640, 640] and _resize_sizes(ref) == [[640, 640], [640, 640]]


def test_an_explicit_size_that_differs_from_input_size_is_an_error_naming_both_files(tmp_path):
    bad = tmp_path / "bad_size.yaml"
    bad.write_text("__include__: ['%s']\neval_spatial_size: [320, 320]\n" % _rel("configs/demo_cpu.yaml", tmp_path))
    with pytest.raises(ConfigError, match=r"bad_size\.yaml: eval_spatial_size = \[320, 320\] differs from "
                                          r"input_size = \[288, 512\] \(.*dset4_r18_synth_cpu\.yaml: input_size\)"):
        YAMLConfig(str(bad))
    with pytest.raises(ConfigError, match=r"val_dataloader\.dataset\.transforms\.ops\.0\.size = \[64, 64\] differs"):
        YAMLConfig("configs/demo_cpu.yaml", overrides={"val_dataloader": {"dataset": {"transforms": {
            "ops": [{"type": "Resize", "size": [64, 64]}, {"type": "ConvertPILImage"}]}}}})
    same = YAMLConfig("configs/demo_cpu.yaml", overrides=["eval_spatial_size=[288, 512]"])
    assert same["eval_spatial_size"] == [288, 512]


@pytest.mark.parametrize("value, match", [("[640]", "two positive integers"), ("[640, 0]", "two positive"),
                                          ("[640, 64.5]", "two positive integers")])
def test_invalid_input_size_is_an_error_naming_the_key(value, match):
    with pytest.raises(ConfigError, match=r"command line \(-u\): input_size = .*" + match):
        YAMLConfig("configs/demo_cpu.yaml", overrides=[f"input_size={value}"])


def test_readme_coco_example_is_the_config_file_and_it_parses_and_builds_on_a_coco_json(tmp_path):
    from PIL import Image

    text = open("README.md").read()
    body = "".join(line for line in open("configs/coco_custom_example.yaml") if not line.startswith("#"))
    assert "\n".join("  " + l if l else "" for l in body.strip("\n").split("\n")) in text
    (tmp_path / "images").mkdir()
    Image.new("RGB", (96, 64)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "a.jpg", "width": 96, "height": 64}],
        "annotations": [{"id": 0, "image_id": 0, "category_id": 5, "bbox": [10, 10, 30, 20]}],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 11, "name": "c"}]}))
    paths = {"img_folder": str(tmp_path / "images"), "ann_file": str(tmp_path / "ann.json")}
    cfg = YAMLConfig("configs/coco_custom_example.yaml", overrides={
        "train_dataloader": {"dataset": paths}, "val_dataloader": {"dataset": paths}})
    assert cfg["eval_spatial_size"] == [640, 640] and cfg["num_classes"] == 3
    ds = cfg.build_spec(cfg["train_dataloader"]["dataset"], ("train_dataloader", "dataset"))
    image, target = ds[0]
    assert tuple(image.shape) == (3, 640, 640) and target["labels"].tolist() == [0]


def test_the_dset_config_survives_the_emas_deep_copy_and_pickling():
    import copy
    import pickle

    d = validate_dset({"cass_normalization": ["patch", "object"], "keep_ratio": 0.5})
    assert copy.deepcopy(d) is d  # immutable: shared by the model and its EMA copy
    back = pickle.loads(pickle.dumps(d))
    assert back == d and back.cass.normalization == ("patch", "object") and back.pruner.keep_ratio == 0.5
