"""Tests of the synthetic roadside generator: geometry, occlusion-aware boxes, statistics, determinism."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from src.data.coco_dataset import CocoDetection
from src.data.synthetic_roadside import (OBJECT_CLASSES, PlacedObject, RoadsideCamera, SceneConfig,
                                         compute_split_statistics, draw_objects, generate_dataset)

CLASS = {c.name: c for c in OBJECT_CLASSES}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    splits = generate_dataset(str(out), num_train=12, num_val=2, width=640, height=360, seed=0)
    return out, splits


def test_projection_matches_a_hand_built_pinhole_camera():
    cam = RoadsideCamera(width=640, height=360, focal_px=500.0, height_m=7.0, pitch_deg=10.0, yaw_deg=20.0,
                         lateral_m=9.0)
    yaw, pitch = math.radians(20.0), math.radians(10.0)
    # optical axis direction in world coordinates: a point along it lands on the principal point
    axis = np.array([math.cos(pitch) * math.cos(yaw), -math.cos(pitch) * math.sin(yaw), -math.sin(pitch)])
    point = cam.position + 30.0 * axis
    assert np.allclose(cam.project(cam.to_camera(point)), [320.0, 180.0])
    assert np.isclose(cam.to_camera(point)[2], 30.0)
    # road direction at infinity: u = cx - f tan(yaw)/cos(pitch), v = cy - f tan(pitch)
    u, v = cam.vanishing_point()
    assert np.isclose(u, 320 - 500 * math.tan(yaw) / math.cos(pitch))
    assert np.isclose(v, 180 - 500 * math.tan(pitch))
    # a point far along the road approaches the vanishing point
    far = cam.project(cam.to_camera(np.array([1e6, 0.0, 0.0])))
    assert np.allclose(far, [u, v], atol=0.05)


def test_default_camera_puts_the_vanishing_point_in_the_upper_left():
    cam = RoadsideCamera.for_image(640, 360)
    u, v = cam.vanishing_point()
    assert 0 < u < 640 / 2 and 0 < v < 360 / 2


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a = generate_dataset(str(tmp_path / "a"), num_train=2, num_val=1, width=320, height=180, seed=5)
    generate_dataset(str(tmp_path / "b"), num_train=2, num_val=1, width=320, height=180, seed=5)
    c = generate_dataset(str(tmp_path / "c"), num_train=2, num_val=1, width=320, height=180, seed=6)
    for split in ("train", "val"):
        ja = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text()
        jb = (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text()
        assert ja == jb
    assert (tmp_path / "a/images/train/000001.jpg").read_bytes() == (tmp_path / "b/images/train/000001.jpg").read_bytes()
    assert a["train"]["annotations"] != c["train"]["annotations"]


def test_statistics_show_the_perspective_density_and_size_gradient(generated):
    _, splits = generated
    stats = compute_split_statistics(splits["train"])
    assert stats["images"] == 12
    assert stats["density_ratio_top_left_vs_bottom"] > 3.0
    assert stats["area_ratio_bottom_vs_top_left"] > 5.0
    assert 15 <= stats["objects_per_image_mean"] <= 45
    assert stats["area_thresholds"] == [32 ** 2, 96 ** 2]
    assert math.isclose(stats["small_fraction"] + stats["medium_fraction"] + stats["large_fraction"], 1.0)
    assert stats["large_fraction"] > 0 and stats["small_fraction"] > 0.3
    assert all(n > 0 for n in stats["per_category"].values())


def test_statistics_match_a_direct_count(generated):
    _, splits = generated
    coco = splits["val"]
    stats = compute_split_statistics(coco)
    tl = bottom = 0
    for a in coco["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        cx, cy = x + w / 2, y + h / 2
        tl += cx < 320 and cy < 180
        bottom += cy >= 180
    pixels = 640 * 360 * len(coco["images"])
    assert math.isclose(stats["density_top_left_per_100k_px"], tl / (pixels / 4) * 1e5)
    assert math.isclose(stats["density_bottom_half_per_100k_px"], bottom / (pixels / 2) * 1e5)


def test_annotations_follow_the_crowd_rules_and_stay_in_the_image(generated):
    out, splits = generated
    coco = splits["train"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco["categories"]] == ["car", "truck", "bus", "pedestrian", "cyclist"]
    crowd_seen = 0
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 640 and y + h <= 360 and w >= 1 and h >= 1
        hidden_or_tiny = min(w, h) < 4 or a["visible_fraction"] < 0.3
        assert a["iscrowd"] == int(hidden_or_tiny)
        crowd_seen += a["iscrowd"]
    assert crowd_seen > 0
    first = coco["images"][0]
    with Image.open(out / "images" / "train" / first["file_name"]) as im:
        assert im.size == (640, 360) and im.mode == "RGB"


def test_occluded_object_box_covers_only_its_visible_part():
    cam = RoadsideCamera.for_image(640, 360)
    scene = SceneConfig()
    # the camera ray through a point on the road: put a bus in front of a car on that ray
    far = PlacedObject(cls=CLASS["car"], x=40.0, y=-3.0, heading=0.0, size=(4.5, 1.85, 1.5), colour=(200, 40, 40))
    direction = np.array([far.x, far.y, 0.75]) - cam.position
    t = 0.55
    near_xy = cam.position + t * direction
    near = PlacedObject(cls=CLASS["bus"], x=float(near_xy[0]), y=float(near_xy[1]), heading=0.0,
                        size=(11.5, 2.6, 3.2), colour=(235, 205, 40))
    alone = draw_objects(Image.new("RGB", (640, 360)), cam, [far], scene)[0]
    both = draw_objects(Image.new("RGB", (640, 360)), cam, [near, far], scene)  # painting order: far first
    far_ann, near_ann = both
    assert far_ann["category_id"] == 1 and near_ann["category_id"] == 3
    assert alone["visible_fraction"] == 1.0 and near_ann["visible_fraction"] == 1.0
    assert far_ann["visible_fraction"] < 0.3 and far_ann["iscrowd"] == 1
    fx, fy, fw, fh = far_ann["bbox"]
    ax, ay, aw, ah = alone["bbox"]
    assert fw * fh < aw * ah and ax <= fx and ay <= fy and fx + fw <= ax + aw and fy + fh <= ay + ah


def test_box_of_an_unoccluded_object_is_tight_on_its_pixels():
    cam = RoadsideCamera.for_image(320, 180)
    obj = PlacedObject(cls=CLASS["pedestrian"], x=20.0, y=2.0, heading=0.3, size=(0.55, 0.55, 1.75),
                       colour=(170, 50, 190))
    image = Image.new("RGB", (320, 180), (0, 0, 0))
    ann = draw_objects(image, cam, [obj], SceneConfig())[0]
    mask = np.asarray(image).any(axis=2)
    ys, xs = np.nonzero(mask)
    assert ann["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                           float(ys.max() - ys.min() + 1)]
    assert ann["visible_fraction"] == 1.0 and ann["iscrowd"] == 0


def test_cli_writes_a_dataset_that_coco_detection_loads(tmp_path, capsys):
    from tools.make_synthetic_roadside import main
    main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--width", "320", "--height", "180",
          "--min-objects", "5", "--max-objects", "8"])
    printed = capsys.readouterr().out
    assert "[train] images=2" in printed and "[val] images=1" in printed and "ratio=" in printed
    ds = CocoDetection(str(tmp_path / "images" / "train"), str(tmp_path / "annotations" / "instances_train.json"))
    img, target = ds[1]
    assert img.shape == (3, 180, 320) and ds.category_names[0] == "car"
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    n_targets = sum(1 for a in coco["annotations"] if a["image_id"] == 2 and not a["iscrowd"])
    assert target["boxes"].shape[0] == n_targets


def test_parallel_generation_gives_the_same_files_as_one_process(tmp_path):
    serial = generate_dataset(str(tmp_path / "one"), num_train=3, num_val=1, width=160, height=96, seed=7,
                              min_objects=4, max_objects=6, image_format="png", workers=1)
    parallel = generate_dataset(str(tmp_path / "two"), num_train=3, num_val=1, width=160, height=96, seed=7,
                                min_objects=4, max_objects=6, image_format="png", workers=2)
    assert serial == parallel
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            a = (tmp_path / "one" / "images" / split / f"{i:06d}.png").read_bytes()
            b = (tmp_path / "two" / "images" / split / f"{i:06d}.png").read_bytes()
            assert a == b
