"""Tests of the COCO dataset, the transforms and the batch collation (small images, fixed seeds)."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from src.core.registry import build
from src.data.collate import BatchImageCollateFunction
from src.data.coco_dataset import CocoDetection, CorruptImageError
from src.data.transforms import (Compose, RandomHorizontalFlip, RandomIoUCrop, RandomZoomOut, Resize,
                                 SanitizeBoundingBoxes, ToDtype)


# ----------------------------------------------------------------------------- helpers
def make_sample(h=100, w=200, boxes=((10, 20, 50, 60),), labels=None, seed=0):
    """(tv Image uint8 [3, h, w], target) with XYXY boxes."""
    g = torch.Generator().manual_seed(seed)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes_t.shape[0]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes_t, format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor(labels if labels is not None else list(range(n)), dtype=torch.int64),
        "image_id": 7,
        "orig_size": torch.tensor([w, h]),
        "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }
    return image, target


def write_coco(tmp_path, images, annotations, categories, make_files=True, name="ann.json"):
    """Write a COCO json and (optionally) solid-colour jpgs for each image entry."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if make_files:
        for im in images:
            Image.new("RGB", (im["width"], im["height"]), (im["id"] * 20 % 255, 80, 120)).save(img_dir / im["file_name"])
    ann_file = tmp_path / name
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(img_dir), str(ann_file)


def img_entry(i, w=64, h=48):
    return {"id": i, "file_name": f"{i:03d}.jpg", "width": w, "height": h}


def ann_entry(aid, image_id, cat, bbox, iscrowd=0):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
            "area": float(bbox[2] * bbox[3]) if all(math.isfinite(v) for v in bbox) else 0.0, "iscrowd": iscrowd}


CATS_3_7_42 = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]


# ----------------------------------------------------------------------------- transforms
def test_horizontal_flip_mirrors_boxes_hand_computed():
    image, target = make_sample(h=100, w=200, boxes=[(10, 20, 50, 60), (150, 0, 200, 100)])
    out_img, out_t = RandomHorizontalFlip(p=1.0)(image, target)
    expected = torch.tensor([[150.0, 20, 190, 60], [0, 0, 50, 100]])  # x' = 200 - x
    assert torch.equal(out_t["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(out_img, image.flip(-1))
    assert torch.equal(out_t["labels"], target["labels"])


def test_resize_scales_boxes_to_non_square_size_hand_computed():
    image, target = make_sample(h=100, w=200, boxes=[(10, 20, 50, 60)])
    out_img, out_t = Resize(size=[50, 400])(image, target)  # [h, w]: x * 2, y * 0.5
    assert out_img.shape == (3, 50, 400)
    assert torch.allclose(out_t["boxes"].as_subclass(torch.Tensor), torch.tensor([[20.0, 10, 100, 30]]))
    assert tuple(out_t["boxes"].canvas_size) == (50, 400)


def test_resize_rejects_a_single_int_size():
    with pytest.raises(ValueError, match=r"\[height, width\]"):
        Resize(size=640)


def test_iou_crop_keeps_boxes_inside_the_image_and_labels_aligned():
    crop, sanitize = RandomIoUCrop(p=1.0), SanitizeBoundingBoxes(min_size=1)
    rng = np.random.default_rng(0)
    for seed in range(25):
        torch.manual_seed(seed)
        xy = rng.uniform(0, 150, size=(6, 2))
        wh = rng.uniform(5, 60, size=(6, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [200, 120])], axis=1)
        image, target = make_sample(h=120, w=200, boxes=boxes.tolist())
        out_img, out_t = sanitize(*crop(image, target))
        h, w = out_img.shape[-2:]
        b = out_t["boxes"].as_subclass(torch.Tensor)
        assert tuple(out_t["boxes"].canvas_size) == (h, w)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
        assert len(out_t["labels"]) == len(b) == len(out_t["area"]) == len(out_t["iscrowd"])
        assert set(out_t["labels"].tolist()) <= set(range(6))


def test_zoom_out_keeps_boxes_inside_and_on_the_same_pixels():
    image, target = make_sample(h=40, w=60, boxes=[(10, 5, 30, 25), (0, 0, 60, 40)])
    for seed in range(10):
        torch.manual_seed(seed)
        out_img, out_t = RandomZoomOut(fill=0, side_range=(1.0, 3.0), p=1.0)(image, target)
        h, w = out_img.shape[-2:]
        b = out_t["boxes"].as_subclass(torch.Tensor)
        assert h >= 40 and w >= 60
        assert (b >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        # sizes unchanged and the full-image box locates the original pixels inside the canvas
        assert torch.allclose(b[:, 2:] - b[:, :2], torch.tensor([[20.0, 20], [60, 40]]))
        x0, y0 = int(b[1, 0]), int(b[1, 1])
        assert torch.equal(out_img[:, y0:y0 + 40, x0:x0 + 60], image)


def test_sanitize_drops_labels_area_and_iscrowd_with_degenerate_boxes():
    image, target = make_sample(h=50, w=50, boxes=[(0, 0, 10, 10), (5, 5, 5.5, 20), (20, 20, 40, 30)],
                                labels=[3, 4, 5])
    _, out = SanitizeBoundingBoxes(min_size=1)(image, target)
    assert out["labels"].tolist() == [3, 5]
    assert out["area"].tolist() == [100.0, 200.0]
    assert out["iscrowd"].tolist() == [0, 0]


HEAVY = ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]


def _pipeline_ops(size=(64, 96)):
    return [{"type": "RandomPhotometricDistort", "p": 1.0}, {"type": "RandomZoomOut", "fill": 0, "p": 1.0},
            {"type": "RandomIoUCrop", "p": 1.0}, {"type": "SanitizeBoundingBoxes", "min_size": 1},
            {"type": "RandomHorizontalFlip", "p": 0.0}, {"type": "Resize", "size": list(size)},
            {"type": "SanitizeBoundingBoxes", "min_size": 1}, {"type": "ToDtype", "dtype": "float32", "scale": True}]


def test_policy_switches_heavy_ops_off_at_the_stop_epoch():
    compose = Compose(ops=_pipeline_ops(), policy={"name": "stop_epoch", "epoch": 3, "ops": HEAVY})
    light = Compose(ops=[op for op in _pipeline_ops() if op["type"] not in HEAVY])
    image, target = make_sample(h=80, w=120, boxes=[(10, 10, 60, 50), (70, 20, 110, 70)])

    compose.set_epoch(2)
    assert [type(t).__name__ for t in compose.transforms if not compose.is_active(t)] == []
    torch.manual_seed(0)
    before_img, before_t = compose(image, dict(target))
    light_img, light_t = light(image, dict(target))
    assert not torch.equal(before_img, light_img)  # heavy ops changed the sample

    compose.set_epoch(3)
    assert [type(t).__name__ for t in compose.transforms if not compose.is_active(t)] == HEAVY
    after_img, after_t = compose(image, dict(target))
    assert torch.equal(after_img, light_img)
    assert torch.equal(after_t["boxes"], light_t["boxes"])
    compose.set_epoch(10)
    assert torch.equal(compose(image, dict(target))[0], light_img)


def test_default_pipeline_outputs_unit_float_image_and_absolute_resized_boxes():
    compose = Compose(ops=_pipeline_ops(size=(64, 96)))
    image, target = make_sample(h=80, w=120, boxes=[(10, 10, 60, 50), (70, 20, 110, 70)])
    torch.manual_seed(1)
    out_img, out_t = compose(image, target)
    assert out_img.dtype == torch.float32 and out_img.shape == (3, 64, 96)
    assert 0.0 <= float(out_img.min()) and float(out_img.max()) <= 1.0
    b = out_t["boxes"]
    assert b.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(b.canvas_size) == (64, 96)
    assert (b[:, 2] <= 96).all() and (b[:, 3] <= 64).all() and (b[:, 2] > b[:, 0]).all()


def test_compose_error_names_the_op_index_and_bad_key():
    with pytest.raises(KeyError, match=r"transforms\.ops\[1\].*unknown key\(s\) \['probability'\]"):
        Compose(ops=[{"type": "Resize", "size": [32, 32]}, {"type": "RandomHorizontalFlip", "probability": 0.5}])


@pytest.mark.parametrize("policy, match", [
    ({"name": "stop_epoch", "epoch": 3}, r"missing key\(s\) \['ops'\]"),
    ({"name": "stop_epoch", "epoch": 3, "ops": [], "extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ({"name": "stop_sample", "epoch": 3, "ops": []}, "only policy is 'stop_epoch'"),
    ({"name": "stop_epoch", "epoch": -1, "ops": []}, "non-negative int"),
    ({"name": "stop_epoch", "epoch": 3, "ops": ["RandomZoomOutt"]}, "unknown component 'RandomZoomOutt'"),
])
def test_policy_validation_rejects_bad_policies(policy, match):
    with pytest.raises((KeyError, ValueError), match=match):
        Compose(ops=[{"type": "RandomZoomOut"}], policy=policy)


def test_photometric_distort_keeps_uint8_image_type_and_boxes():
    image, target = make_sample(h=40, w=60)
    torch.manual_seed(0)
    out_img, out_t = build({"type": "RandomPhotometricDistort", "p": 1.0})(image, target)
    assert isinstance(out_img, tv_tensors.Image) and out_img.dtype == torch.uint8 and out_img.shape == image.shape
    assert not torch.equal(out_img, image)
    assert torch.equal(out_t["boxes"], target["boxes"])


def test_normalize_is_per_channel_mean_std_hand_computed():
    image = tv_tensors.Image(torch.stack([torch.full((2, 2), v) for v in (0.5, 0.25, 1.0)]))
    out = build({"type": "Normalize", "mean": [0.5, 0.25, 0.5], "std": [0.5, 0.25, 0.25]})(image)
    assert torch.allclose(out, torch.stack([torch.full((2, 2), v) for v in (0.0, 0.0, 2.0)]))


# ----------------------------------------------------------------------------- collate
def _float_sample(h, w, boxes, value=1.0):
    img, t = make_sample(h=h, w=w, boxes=boxes)
    return ToDtype("float32", scale=True)(img, t)


def test_collate_pads_to_multiple_of_32_and_normalises_to_padded_size():
    a = _float_sample(50, 70, [(10, 20, 30, 40)])
    b = _float_sample(64, 40, [(0, 0, 40, 64), (4, 8, 12, 16)])
    images, targets = BatchImageCollateFunction()([a, b])
    assert images.shape == (2, 3, 64, 96)  # max h 64 -> 64, max w 70 -> 96
    assert torch.equal(images[0, :, :50, :70], a[0]) and images[0, :, 50:].abs().sum() == 0
    assert images[0, :, :, 70:].abs().sum() == 0 and torch.equal(images[1, :, :64, :40], b[0])
    # box (10,20,30,40): cx=20, cy=30, w=20, h=20 over (96, 64)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[20 / 96, 30 / 64, 20 / 96, 20 / 64]]))
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[20 / 96, 32 / 64, 40 / 96, 64 / 64],
                                                             [8 / 96, 12 / 64, 8 / 96, 8 / 64]]))
    assert type(targets[0]["boxes"]) is torch.Tensor
    assert targets[0]["size"].tolist() == [70, 50] and targets[1]["size"].tolist() == [40, 64]
    assert targets[0]["padded_size"].tolist() == [96, 64]
    assert targets[0]["orig_size"].tolist() == [70, 50] and targets[0]["image_id"] == 7
    assert targets[1]["labels"].tolist() == [0, 1]


def test_collate_handles_images_without_boxes():
    a = _float_sample(32, 32, [])
    b = _float_sample(33, 20, [(1, 1, 5, 5)])
    images, targets = BatchImageCollateFunction()([a, b])
    assert images.shape == (2, 3, 64, 32)
    assert targets[0]["boxes"].shape == (0, 4)
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[3 / 32, 3 / 64, 4 / 32, 4 / 64]]))


def test_collate_multiscale_resizes_batch_and_stops_at_stop_epoch():
    a = _float_sample(64, 64, [(16, 16, 48, 32)])
    b = _float_sample(64, 64, [(0, 0, 64, 64)])
    collate = BatchImageCollateFunction(scales=[[96, 128], [32, 32]], stop_epoch=2)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        images, targets = collate([a, b])
        seen.add(tuple(images.shape[-2:]))
        # content fills the whole (already multiple-of-32) canvas: normalised boxes are unchanged
        assert torch.allclose(targets[0]["boxes"], torch.tensor([[0.5, 0.375, 0.5, 0.25]]))
        assert targets[0]["size"].tolist() == [images.shape[-1], images.shape[-2]]
    assert seen == {(96, 128), (32, 32)}
    torch.manual_seed(3)
    first = collate([a, b])[0]
    torch.manual_seed(3)
    assert torch.equal(first, collate([a, b])[0])  # seeded by the torch RNG
    collate.set_epoch(2)
    for seed in range(4):
        torch.manual_seed(seed)
        assert collate([a, b])[0].shape == (2, 3, 64, 64)


def test_collate_multiscale_with_uneven_sizes_normalises_to_padded_canvas():
    a = _float_sample(40, 60, [(6, 4, 30, 20)])
    b = _float_sample(20, 30, [(0, 0, 30, 20)])
    images, targets = BatchImageCollateFunction(scales=[[50, 90]])([a, b])
    # common size 40x60 -> 50x90 (sx=1.5, sy=1.25) -> padded 64x96
    assert images.shape == (2, 3, 64, 96)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[27 / 96, 15 / 64, 36 / 96, 20 / 64]]))
    assert targets[1]["size"].tolist() == [45, 25]
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[22.5 / 96, 12.5 / 64, 45 / 96, 25 / 64]]))


def test_collate_rejects_malformed_scales():
    with pytest.raises(ValueError, match=r"scales\[1\]"):
        BatchImageCollateFunction(scales=[[640, 640], [640]])


# ----------------------------------------------------------------------------- dataset
def test_category_ids_remapped_to_contiguous_labels_in_sorted_id_order(tmp_path):
    images = [img_entry(1), img_entry(2)]
    anns = [ann_entry(1, 1, 42, (1, 2, 10, 10)), ann_entry(2, 1, 3, (5, 5, 10, 10)), ann_entry(3, 2, 7, (0, 0, 8, 8))]
    ds = CocoDetection(*write_coco(tmp_path, images, anns, CATS_3_7_42))
    assert ds.label_to_category_id == {0: 3, 1: 7, 2: 42}
    assert ds.category_id_to_label == {3: 0, 7: 1, 42: 2}
    assert ds.category_names == ["c3", "c7", "c42"] and ds.num_classes == 3
    img, t = ds[0]
    assert t["labels"].tolist() == [2, 0]
    assert torch.equal(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[1.0, 2, 11, 12], [5, 5, 15, 15]]))
    assert ds[1][1]["labels"].tolist() == [1]


def test_getitem_returns_uint8_image_and_typed_target(tmp_path):
    ds = CocoDetection(*write_coco(tmp_path, [img_entry(5, w=64, h=48)], [ann_entry(1, 5, 3, (1, 2, 10, 10))],
                                   CATS_3_7_42))
    img, t = ds[0]
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.uint8 and img.shape == (3, 48, 64)
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].format.value == "XYXY"
    assert tuple(t["boxes"].canvas_size) == (48, 64)
    assert t["image_id"] == 5 and t["orig_size"].tolist() == [64, 48]
    assert t["labels"].dtype == torch.int64 and t["area"].tolist() == [100.0] and t["iscrowd"].tolist() == [0]


def test_crowd_boxes_are_not_training_targets(tmp_path):
    anns = [ann_entry(1, 1, 3, (1, 1, 10, 10)), ann_entry(2, 1, 7, (20, 20, 10, 10), iscrowd=1)]
    ds = CocoDetection(*write_coco(tmp_path, [img_entry(1)], anns, CATS_3_7_42))
    t = ds[0][1]
    assert t["labels"].tolist() == [0] and t["boxes"].shape == (1, 4) and t["iscrowd"].tolist() == [0]
    assert ds.box_stats["crowd_excluded"] == 1 and ds.box_stats["kept"] == 1


def test_images_without_boxes_are_kept(tmp_path):
    images = [img_entry(1), img_entry(2), img_entry(3)]
    ds = CocoDetection(*write_coco(tmp_path, images, [ann_entry(1, 2, 3, (1, 1, 10, 10))], CATS_3_7_42))
    assert len(ds) == 3
    assert [ds[i][1]["boxes"].shape[0] for i in range(3)] == [0, 1, 0]
    assert ds[0][1]["labels"].dtype == torch.int64


def test_missing_image_is_an_error_at_construction_naming_file_and_image_id(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1), img_entry(2)], [], CATS_3_7_42)
    os.remove(os.path.join(img_dir, "002.jpg"))
    with pytest.raises(CorruptImageError, match=r"1 of 2 images(.|\n)*002\.jpg' \(image id 2\) is missing"):
        CocoDetection(img_dir, ann)


def test_unreadable_image_is_an_error_at_construction_naming_file_and_image_id(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1), img_entry(2)], [], CATS_3_7_42)
    with open(os.path.join(img_dir, "001.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(CorruptImageError, match=r"001\.jpg' \(image id 1\) cannot be read"):
        CocoDetection(img_dir, ann)


def test_image_check_at_construction_is_header_only_and_deferred_check_still_catches_it(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1), img_entry(2)], [], CATS_3_7_42)
    os.remove(os.path.join(img_dir, "002.jpg"))
    ds = CocoDetection(img_dir, ann, check_images=False)
    assert ds[0][0].shape == (3, 48, 64)
    with pytest.raises(CorruptImageError, match=r"002\.jpg.*image id 2.*missing.*skip_corrupt: true"):
        ds[1]


def test_truncated_jpeg_passes_the_header_check_and_fails_at_load_naming_file_id_and_truncation(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1, w=64, h=48)], [], CATS_3_7_42)
    path = os.path.join(img_dir, "001.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # header intact, half the scan data gone
    ds = CocoDetection(img_dir, ann)  # the header is fine
    with pytest.raises(CorruptImageError, match=r"001\.jpg.*image id 1.*cannot be decoded \(the file is truncated\)"):
        ds[0]


def test_skip_corrupt_leaves_bad_images_out_at_start_and_warns_without_the_skip_advice(tmp_path, caplog):
    images = [img_entry(1), img_entry(2), img_entry(3), img_entry(4)]
    anns = [ann_entry(1, 3, 3, (1, 1, 10, 10)), ann_entry(2, 2, 7, (1, 1, 10, 10))]
    img_dir, ann = write_coco(tmp_path, images, anns, CATS_3_7_42)
    open(os.path.join(img_dir, "001.jpg"), "wb").write(b"garbage")
    os.remove(os.path.join(img_dir, "002.jpg"))
    Image.new("RGB", (10, 10)).save(os.path.join(img_dir, "004.jpg"))  # size differs from the json
    with caplog.at_level(logging.WARNING, logger="src.data.coco_dataset"):
        ds = CocoDetection(img_dir, ann, skip_corrupt=True)
    assert len(ds) == 1 and ds.image_ids == [3]
    assert [p["image_id"] for p in ds.skipped_at_start] == [1, 2, 4]
    assert ds[0][1]["labels"].tolist() == [0] and ds.box_stats["kept"] == 1  # image 2's annotation went too
    text = caplog.text
    assert "skip_corrupt is on: leaving out 3 of 4 images" in text
    assert "001.jpg" in text and "002.jpg" in text and "004.jpg" in text
    assert "set skip_corrupt" not in text


def test_skip_corrupt_at_load_returns_next_readable_image_counts_and_warns_without_the_advice(tmp_path, caplog):
    images = [img_entry(1), img_entry(2), img_entry(3)]
    anns = [ann_entry(1, 3, 3, (1, 1, 10, 10))]
    img_dir, ann = write_coco(tmp_path, images, anns, CATS_3_7_42)
    ds = CocoDetection(img_dir, ann, skip_corrupt=True)
    open(os.path.join(img_dir, "001.jpg"), "wb").write(b"garbage")  # broken after construction
    os.remove(os.path.join(img_dir, "002.jpg"))
    with caplog.at_level(logging.WARNING, logger="src.data.coco_dataset"):
        _, t = ds[0]
    assert t["image_id"] == 3 and t["labels"].tolist() == [0]
    assert ds.num_skipped == 2
    assert "001.jpg" in caplog.text and "002.jpg" in caplog.text
    assert "skip_corrupt is on: skipping" in caplog.text and "set skip_corrupt" not in caplog.text
    assert ds[1][1]["image_id"] == 3 and ds.num_skipped == 3
    assert ds[0][1]["image_id"] == 3  # deterministic


def test_image_size_mismatch_with_json_is_an_error_at_construction(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1, w=64, h=48)], [], CATS_3_7_42)
    Image.new("RGB", (32, 32)).save(os.path.join(img_dir, "001.jpg"))
    with pytest.raises(CorruptImageError, match=r"001\.jpg' \(image id 1\) is 32x32 but the json says 64x48"
                                                r"(.|\n)*fix the json's width/height"):
        CocoDetection(img_dir, ann)


def test_missing_annotation_file_error_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(str(tmp_path), str(tmp_path / "nope.json"))


def test_invalid_annotation_json_error_names_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid json"):
        CocoDetection(str(tmp_path), str(bad))
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"bad\.json.*'images'"):
        CocoDetection(str(tmp_path), str(bad))


def test_unknown_category_error_names_annotation_image_and_category(tmp_path):
    anns = [ann_entry(11, 1, 3, (1, 1, 5, 5)), ann_entry(12, 1, 99, (1, 1, 5, 5))]
    img_dir, ann = write_coco(tmp_path, [img_entry(1)], anns, CATS_3_7_42, make_files=False)
    with pytest.raises(ValueError, match=r"annotation id 12 \(image id 1\) has category_id 99"):
        CocoDetection(img_dir, ann)


def test_num_classes_smaller_than_dataset_is_an_error_naming_both_and_the_key(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1)], [], CATS_3_7_42, make_files=False)
    with pytest.raises(ValueError, match=r"num_classes=2 is smaller than the 3 categories.*`num_classes`"):
        CocoDetection(img_dir, ann, num_classes=2)
    assert CocoDetection(img_dir, ann, num_classes=80, check_images=False).num_classes == 80


def test_empty_dataset_is_an_error(tmp_path):
    img_dir, ann = write_coco(tmp_path, [], [], CATS_3_7_42, make_files=False)
    with pytest.raises(ValueError, match="no images"):
        CocoDetection(img_dir, ann)


def test_bad_boxes_are_clipped_or_dropped_and_counted_once(tmp_path, caplog):
    anns = [
        ann_entry(1, 1, 3, (10, 10, 20, 20)),            # fine
        ann_entry(2, 1, 3, (5, 5, 0, 10)),               # zero width -> dropped
        ann_entry(3, 1, 3, (30, 30, -5, 4)),             # negative width -> dropped
        ann_entry(4, 1, 3, (float("nan"), 1, 5, 5)),     # NaN -> dropped
        ann_entry(5, 1, 3, (1, 1, float("inf"), 5)),     # inf -> dropped
        ann_entry(6, 1, 3, (-10, 40, 30, 20)),           # partly outside (64x48) -> clipped to (0,40,20,48)
        ann_entry(7, 1, 3, (70, 10, 5, 5)),              # fully outside -> degenerate after clipping
    ]
    img_dir, ann = write_coco(tmp_path, [img_entry(1)], anns, CATS_3_7_42)
    with caplog.at_level(logging.WARNING, logger="src.data.coco_dataset"):
        ds = CocoDetection(img_dir, ann)
    # box 7 is clipped and then degenerate: counted once, as dropped (clipped counts kept boxes only)
    assert ds.box_stats == {"annotations": 7, "crowd_excluded": 0, "nonfinite_dropped": 2, "clipped": 1,
                            "degenerate_dropped": 3, "parsed_strings": 0, "kept": 2}
    assert len([r for r in caplog.records if "fixed boxes" in r.getMessage()]) == 1
    boxes = ds[0][1]["boxes"].as_subclass(torch.Tensor)
    assert torch.equal(boxes, torch.tensor([[10.0, 10, 30, 30], [0, 40, 20, 48]]))


def test_dataset_builds_transforms_and_set_epoch_reaches_the_policy(tmp_path):
    img_dir, ann = write_coco(tmp_path, [img_entry(1, w=96, h=64)], [ann_entry(1, 1, 7, (10, 10, 30, 20))],
                              CATS_3_7_42)
    spec = {"type": "Compose", "ops": _pipeline_ops(size=(32, 64)),
            "policy": {"name": "stop_epoch", "epoch": 1, "ops": HEAVY}}
    ds = CocoDetection(img_dir, ann, transforms=spec)
    ds.set_epoch(1)
    assert ds.transforms.epoch == 1
    img, t = ds[0]
    assert img.shape == (3, 32, 64) and img.dtype == torch.float32
    # no heavy ops: the box is only resized (x / 1.5, y / 2)
    assert torch.allclose(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[10 / 1.5, 5, 40 / 1.5, 15]]))


def test_dataloader_with_workers_yields_padded_batches(tmp_path):
    images = [img_entry(i, w=80, h=60) for i in range(1, 5)]
    anns = [ann_entry(i, i, 3, (5, 5, 20, 10)) for i in range(1, 5)]
    img_dir, ann = write_coco(tmp_path, images, anns, CATS_3_7_42)
    spec = {"type": "Compose", "ops": [{"type": "Resize", "size": [50, 70]}, {"type": "ToDtype"}]}
    ds = CocoDetection(img_dir, ann, transforms=spec)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=BatchImageCollateFunction())
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 64, 96)
    assert [t["image_id"] for _, ts in batches for t in ts] == [1, 2, 3, 4]
    # box (5,5,25,15) in 80x60 -> resized to 70x50 -> normalised to 96x64
    sx, sy = 70 / 80, 50 / 60
    expected = torch.tensor([[15 * sx / 96, 10 * sy / 64, 20 * sx / 96, 10 * sy / 64]])
    assert torch.allclose(batches[0][1][0]["boxes"], expected, atol=1e-6)
