"""Tests of the DAIR-V2X-I -> COCO converter on a 5-frame fixture in the DAIR layout."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from src.data.coco_dataset import CocoDetection
from src.data.dairv2x import CATEGORIES, convert_box, convert_dairv2x

FIXTURE = Path(__file__).parent / "fixtures" / "dairv2x_mini"
WIDTH, HEIGHT = 192, 108  # tiny stand-ins for the 1920x1080 images
CLASS_ID = {c["name"]: c["id"] for c in CATEGORIES}


@pytest.fixture
def dair_root(tmp_path):
    """The fixture copied to tmp_path plus tiny jpgs for every frame of data_info.json."""
    root = tmp_path / "single-infrastructure-side"
    shutil.copytree(FIXTURE, root)
    (root / "image").mkdir()
    for entry in json.loads((root / "data_info.json").read_text()):
        Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(root / entry["image_path"])
    return root


def _load(out, split):
    return json.loads((out / f"instances_{split}.json").read_text())


def test_categories_are_the_eight_classes_with_ids_1_to_8():
    assert [(c["id"], c["name"]) for c in CATEGORIES] == [
        (1, "Car"), (2, "Truck"), (3, "Van"), (4, "Bus"), (5, "Pedestrian"), (6, "Cyclist"), (7, "Motorcyclist"),
        (8, "Trafficcone")]


def test_converter_maps_classes_crowd_and_counts_on_the_fixture(dair_root, tmp_path):
    out = tmp_path / "coco"
    report = convert_dairv2x(str(dair_root), str(out), split_json=str(dair_root / "split.json"))
    train, val, test = _load(out, "train"), _load(out, "val"), _load(out, "test")

    assert [im["file_name"] for im in train["images"]] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert [im["id"] for im in train["images"]] == [0, 1, 2]
    assert [im["file_name"] for im in val["images"]] == ["000003.jpg"]
    assert [im["file_name"] for im in test["images"]] == ["000004.jpg"] and test["annotations"] == []
    assert all((im["width"], im["height"]) == (WIDTH, HEIGHT) for im in train["images"])

    got = [(a["image_id"], a["dair_type"], a["category_id"], a["iscrowd"]) for a in train["annotations"]]
    assert got == [
        (0, "Car", CLASS_ID["Car"], 0), (0, "truck", CLASS_ID["Truck"], 0), (0, "Van", CLASS_ID["Van"], 0),
        (0, "Barrowlist", CLASS_ID["Cyclist"], 0), (0, "PedestrianIgnore", CLASS_ID["Pedestrian"], 1),
        (1, "Bus", CLASS_ID["Bus"], 0), (1, "Pedestrian", CLASS_ID["Pedestrian"], 0),
        (1, "Unknown_unmovable", CLASS_ID["Car"], 1),
        (2, "Motorcyclist", CLASS_ID["Motorcyclist"], 0), (2, "TRAFFICCONE", CLASS_ID["Trafficcone"], 0),
        (2, "CarIgnore", CLASS_ID["Car"], 1), (2, "Cyclist", CLASS_ID["Cyclist"], 0),
    ]
    assert [(a["dair_type"], a["category_id"], a["iscrowd"]) for a in val["annotations"]] == [
        ("Car", CLASS_ID["Car"], 0), ("OtherIgnore", CLASS_ID["Car"], 1)]
    assert [a["id"] for a in train["annotations"]] == list(range(1, 13))

    # string numbers parsed; COCO [x, y, w, h]; the Cyclist box (180..200) is clipped to the 192-px image
    assert train["annotations"][0]["bbox"] == [10.0, 20.0, 40.0, 20.0]
    assert train["annotations"][0]["area"] == 800.0
    assert train["annotations"][1]["bbox"] == [60.0, 10.0, 40.0, 40.0]  # numeric (non-string) input
    assert train["annotations"][-1]["bbox"] == [180.0, 50.0, 12.0, 20.0]
    assert val["annotations"][1]["bbox"] == [0.0, 80.0, 20.0, 20.0]

    assert report.images == {"train": 3, "val": 1, "test": 1}
    assert sum(report.annotations["train"].values()) == 9 and sum(report.crowd["train"].values()) == 3
    assert report.annotations["train"]["Cyclist"] == 2
    assert report.dropped_types == {"tricyclist": 1}
    assert report.unknown_types == {"Spaceship": 1}
    assert report.degenerate == 1 and report.clipped == 1
    summary = report.summary()
    assert "Spaceship" in summary and "tricyclist" in summary and "degenerate boxes dropped: 1" in summary


def test_default_split_with_blocks_of_one_is_a_seeded_80_20_split(dair_root, tmp_path):
    a = convert_dairv2x(str(dair_root), str(tmp_path / "a"), seed=0, block_size=1)
    convert_dairv2x(str(dair_root), str(tmp_path / "b"), seed=0, block_size=1)
    assert a.images == {"train": 4, "val": 1}
    assert _load(tmp_path / "a", "val") == _load(tmp_path / "b", "val")
    train_names = {im["file_name"] for im in _load(tmp_path / "a", "train")["images"]}
    val_names = {im["file_name"] for im in _load(tmp_path / "a", "val")["images"]}
    assert not train_names & val_names and len(train_names | val_names) == 5
    seeds_val = set()
    for seed in range(6):
        convert_dairv2x(str(dair_root), str(tmp_path / f"s{seed}"), seed=seed, block_size=1)
        seeds_val.add(tuple(im["file_name"] for im in _load(tmp_path / f"s{seed}", "val")["images"]))
    assert len(seeds_val) > 1  # the seed changes the split


def _synthetic_root(root, cameras=("172.16.0.1", "172.16.0.2"), frames_per_camera=20, labels=True):
    """A DAIR-V2X-I folder: consecutive frame ids per camera, one Car per frame, tiny images."""
    (root / "image").mkdir(parents=True)
    (root / "label" / "camera").mkdir(parents=True)
    info, k = [], 0
    for cam in cameras:
        for _ in range(frames_per_camera):
            fid = f"{k:06d}"
            Image.new("RGB", (32, 18)).save(root / "image" / f"{fid}.jpg")
            if labels:
                (root / "label" / "camera" / f"{fid}.json").write_text(json.dumps(
                    [{"type": "Car", "2d_box": {"xmin": "1", "ymin": "1", "xmax": "9", "ymax": "9"}}]))
            info.append({"image_path": f"image/{fid}.jpg", "label_camera_std_path": f"label/camera/{fid}.json",
                         "camera_ip": cam, "camera_id": "0"})
            k += 1
    (root / "data_info.json").write_text(json.dumps(info))
    return root


def test_default_split_keeps_blocks_of_consecutive_frames_of_one_camera_together(tmp_path):
    from src.data.dairv2x import contiguous_blocks

    root = _synthetic_root(tmp_path / "dair")
    frames = {e["image_path"][6:12]: e for e in json.loads((root / "data_info.json").read_text())}
    blocks = contiguous_blocks(frames, 6)  # camera 1: frames 0-19, camera 2: 20-39 -> 6+6+6+2 per camera
    assert [len(b) for b in blocks] == [6, 6, 6, 2, 6, 6, 6, 2]
    assert blocks[3] == ["000018", "000019"] and blocks[4][0] == "000020"  # no block spans two cameras
    splits = []
    for seed in (0, 1, 2):
        convert_dairv2x(str(root), str(tmp_path / f"o{seed}"), seed=seed, block_size=6)
        val = [int(im["dair_id"]) for im in _load(tmp_path / f"o{seed}", "val")["images"]]
        train = {int(im["dair_id"]) for im in _load(tmp_path / f"o{seed}", "train")["images"]}
        assert 8 <= len(val) <= 8 + 5 and not train & set(val) and len(train) + len(val) == 40
        chosen = [b for b in blocks if int(b[0]) in val]
        assert sorted(int(f) for b in chosen for f in b) == sorted(val)  # val is a union of whole blocks
        splits.append(tuple(val))
    assert len(set(splits)) > 1


def test_devkit_spellings_are_mapped_and_an_entry_with_only_label_camera_path_is_read(tmp_path):
    root = _synthetic_root(tmp_path / "dair", cameras=("c",), frames_per_camera=2, labels=False)
    info = json.loads((root / "data_info.json").read_text())
    for e in info:
        del e["label_camera_std_path"]
        e["label_camera_path"] = f"label/camera/{e['image_path'][6:12]}.json"
    (root / "data_info.json").write_text(json.dumps(info))
    box = {"xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9}
    objs = [{"type": t, "2d_box": box} for t in ("car", "barrow", "unknowns_movable", "Unknowns_Unmovable",
                                                   "pedestrian", "trafficcone")]
    for e in info:
        (root / e["label_camera_path"]).write_text(json.dumps(objs))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["000000"], "val": ["000001"]}))
    report = convert_dairv2x(str(root), str(tmp_path / "out"), split_json=str(tmp_path / "split.json"))
    got = [(a["dair_type"], a["category_id"], a["iscrowd"]) for a in _load(tmp_path / "out", "train")["annotations"]]
    assert got == [("car", CLASS_ID["Car"], 0), ("barrow", CLASS_ID["Cyclist"], 0),
                   ("unknowns_movable", CLASS_ID["Car"], 1), ("Unknowns_Unmovable", CLASS_ID["Car"], 1),
                   ("pedestrian", CLASS_ID["Pedestrian"], 0), ("trafficcone", CLASS_ID["Trafficcone"], 0)]
    assert not report.unknown_types


def test_missing_label_file_is_an_error_before_anything_is_written_or_a_counted_skip(tmp_path):
    from src.data.dairv2x import DairConversionError

    root = _synthetic_root(tmp_path / "dair", cameras=("c",), frames_per_camera=6)
    (root / "label" / "camera" / "000004.json").unlink()
    (tmp_path / "split.json").write_text(json.dumps({"train": ["000000", "000001", "000002"],
                                                     "val": ["000003", "000004", "000005"]}))
    out = tmp_path / "out"
    with pytest.raises(DairConversionError, match=r"1 of 6 frames have no camera label file \(first: frame 000004"
                                                  r".*nothing was written.*--skip-missing-labels"):
        convert_dairv2x(str(root), str(out), split_json=str(tmp_path / "split.json"))
    assert not out.exists() or not list(out.iterdir())  # train was not written either
    report = convert_dairv2x(str(root), str(out), split_json=str(tmp_path / "split.json"), skip_missing_labels=True)
    assert report.images == {"train": 3, "val": 2} and report.missing_labels == ["000004"]
    assert [im["dair_id"] for im in _load(out, "val")["images"]] == ["000003", "000005"]
    assert "frames without a camera label file, skipped: 1" in report.summary()
    assert sorted(p.name for p in out.iterdir()) == ["instances_train.json", "instances_val.json"]  # no temporaries


def test_empty_split_or_one_with_most_ids_missing_is_an_error_naming_the_likely_cause(tmp_path, capsys):
    from src.data.dairv2x import DairConversionError
    from tools.convert_dairv2x import main

    root = _synthetic_root(tmp_path / "dair", cameras=("c",), frames_per_camera=4)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["000000", "000001"], "val": []}))
    with pytest.raises(DairConversionError, match=r"split 'val' is empty"):
        convert_dairv2x(str(root), str(tmp_path / "out"), split_json=str(split))
    split.write_text(json.dumps({"train": ["000000", "000001"], "val": ["000002", "123456", "123457"]}))
    with pytest.raises(DairConversionError, match=r"split 'val'.*2 of its 3 frame ids are not in .*data_info\.json.*"
                                                  r"--root.*single-infrastructure-split-data\.json"):
        convert_dairv2x(str(root), str(tmp_path / "out"), split_json=str(split))
    assert not (tmp_path / "out").exists()
    assert main(["--root", str(root), "--out", str(tmp_path / "out"), "--split-json", str(split)]) == 2
    assert "not in" in capsys.readouterr().err
    assert main(["--root", str(root), "--out", str(tmp_path / "out"), "--split-json", str(split),
                 "--splits", "train"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["instances_train.json"]


def test_converted_json_loads_in_coco_detection_without_crowd_targets(dair_root, tmp_path):
    out = tmp_path / "coco"
    convert_dairv2x(str(dair_root), str(out), split_json=str(dair_root / "split.json"))
    ds = CocoDetection(str(dair_root / "image"), str(out / "instances_train.json"))
    assert ds.category_names[:2] == ["Car", "Truck"] and ds.num_classes == 8
    _, t = ds[0]
    assert t["labels"].tolist() == [0, 1, 2, 5]  # Car, Truck, Van, Cyclist (Barrowlist); PedestrianIgnore excluded
    assert ds.box_stats["crowd_excluded"] == 3


def test_convert_box_parses_strings_and_rejects_degenerate_boxes():
    assert convert_box({"xmin": "1.5", "ymin": "2", "xmax": "11.5", "ymax": "4"}, 100, 100) == ([1.5, 2.0, 10.0, 2.0], False)
    assert convert_box({"xmin": "5", "ymin": "5", "xmax": "5", "ymax": "9"}, 100, 100)[0] is None
    assert convert_box({"xmin": "nan", "ymin": "5", "xmax": "8", "ymax": "9"}, 100, 100)[0] is None
    assert convert_box({"xmin": "abc", "ymin": "5", "xmax": "8", "ymax": "9"}, 100, 100)[0] is None
    assert convert_box({"xmin": -5, "ymin": 90, "xmax": 10, "ymax": 120}, 100, 100) == ([0.0, 90.0, 10.0, 10.0], True)


def test_missing_data_info_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_info.json"):  # a DataError too
        convert_dairv2x(str(tmp_path), str(tmp_path / "out"))


def test_split_json_with_unknown_split_name_is_an_error(dair_root, tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["000000"], "validation": ["000001"]}))
    with pytest.raises(ValueError, match=r"unknown split name\(s\) \['validation'\]"):
        convert_dairv2x(str(dair_root), str(tmp_path / "out"), split_json=str(bad))


def test_cli_prints_the_summary(dair_root, tmp_path, capsys):
    from tools.convert_dairv2x import main
    main(["--root", str(dair_root), "--out", str(tmp_path / "coco"), "--split-json", str(dair_root / "split.json")])
    printed = capsys.readouterr().out
    assert "[train] images=3 annotations=9 (+3 iscrowd)" in printed
    assert "UNKNOWN types skipped: {'Spaceship': 1}" in printed


def test_test_split_without_downloaded_frames_advises_splits_train_val_first(tmp_path):
    from src.data.dairv2x import DairConversionError

    root = _synthetic_root(tmp_path / "dair", cameras=("c",), frames_per_camera=4)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["000000", "000001"], "val": ["000002"], "test": ["900000", "900001"]}))
    with pytest.raises(DairConversionError) as e:
        convert_dairv2x(str(root), str(tmp_path / "out"), split_json=str(split))
    message = str(e.value)
    assert "test frames are not part of your download" in message
    assert message.index("--splits train val") < message.index("--root")


def test_split_file_whose_splits_share_ids_is_refused(tmp_path):
    from src.data.dairv2x import DairConversionError

    root = _synthetic_root(tmp_path / "dair", cameras=("c",), frames_per_camera=4)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["000000", "000001", "000002"], "val": ["000002", "000003"]}))
    with pytest.raises(DairConversionError, match=r"splits 'train' and 'val' share 1 frame id\(s\) \(e\.g\. 000002\)"):
        convert_dairv2x(str(root), str(tmp_path / "out"), split_json=str(split))
    assert not (tmp_path / "out").exists()
