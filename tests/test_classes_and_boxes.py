"""One class list from training, one box clean-up, conventions and leakage checked at start.

Every AP case scores perfect predictions: the val ground truth itself, built here from the raw json (the
training label of each box found by name by hand, the box clipped by hand), so the right answer is AP 1.0
whatever the json's ids, order or case."""
import json
import logging

import pytest
import torch

from src.core.yaml_utils import ConfigError
from src.data.classes import ClassList, ClassMismatchError, match_classes
from src.data.coco_dataset import CocoDetection
from src.data.coco_json import AnnotationError
from src.solver.evaluator import evaluator_for
from src.solver.loaders import check_boxes_survive_transforms, check_leakage, prepare_val_data
from tests.test_data import ann_entry, img_entry, write_coco

TRAIN_CATS = [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}]
W, H = 64, 48
BOXES = [(2, 3, 20, 15), (30, 20, 25, 20), (5, 25, 12, 18), (40, 2, 10, 10)]   # inside a 64 x 48 image


def _split(tmp_path, name, cats, cat_of_box, boxes=BOXES, images=3, make_files=False):
    """A json of `images` images, each with every box of `boxes`, box k in category cat_of_box[k]."""
    folder = tmp_path / name
    folder.mkdir()
    anns, aid = [], 1
    for i in range(1, images + 1):
        for k, box in enumerate(boxes):
            anns.append({"id": aid, "image_id": i, "category_id": cat_of_box[k % len(cat_of_box)], "bbox": list(box),
                         "iscrowd": 0})   # no area: both sides fill it from the clipped box
            aid += 1
    return write_coco(folder, [img_entry(i, W, H) for i in range(1, images + 1)], anns, cats, make_files=make_files)


def _train_classes(tmp_path):
    img_dir, ann = _split(tmp_path, "train", TRAIN_CATS, [1, 2])
    return CocoDetection(img_dir, ann, check_images=False).classes


def _perfect_ap(val_ann, val_dataset, classes, extra_label=None):
    """Score the raw val json's boxes as detections, labelled with the training label of the same name
    (found by hand, ignoring case); boxes of a class training lacks are not predicted."""
    gt = json.loads(open(val_ann).read())
    name_of = {c["id"]: c["name"].lower() for c in gt["categories"]}
    label_of = {n.lower(): i for i, n in enumerate(classes.names)}
    evaluator = evaluator_for(val_dataset, classes)
    for img in gt["images"]:
        rows = [a for a in gt["annotations"] if a["image_id"] == img["id"] and name_of[a["category_id"]] in label_of]
        boxes = [[float(v) for v in a["bbox"]] for a in rows]
        xyxy = torch.tensor([[x, y, min(x + w, img["width"]), min(y + h, img["height"])] for x, y, w, h in boxes],
                            dtype=torch.float64).reshape(-1, 4).clamp(min=0)
        labels = [label_of[name_of[a["category_id"]]] for a in rows]
        scores = [1.0] * len(rows)
        if extra_label is not None:   # a detection of a class the val json lacks
            xyxy = torch.cat([xyxy, torch.tensor([[0.0, 0.0, 5.0, 5.0]], dtype=torch.float64)])
            labels, scores = labels + [extra_label], scores + [0.9]
        evaluator.update({img["id"]: {"boxes": xyxy, "scores": torch.tensor(scores), "labels": torch.tensor(labels)}})
    return evaluator.summarize()


@pytest.mark.parametrize("cats, cat_of_box", [
    ([{"id": 1, "name": "truck"}, {"id": 2, "name": "car"}], [2, 1]),    # permuted ids
    ([{"id": 3, "name": "truck"}, {"id": 7, "name": "car"}], [7, 3]),    # renumbered
    ([{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "truck"}], [1, 3, 2]),   # superset
])
def test_val_classes_are_matched_by_name_and_perfect_predictions_score_ap_one(tmp_path, cats, cat_of_box):
    classes = _train_classes(tmp_path)
    img_dir, ann = _split(tmp_path, "val", cats, cat_of_box)
    val = CocoDetection(img_dir, ann, check_images=False)
    match = val.use_classes(classes)
    summary = _perfect_ap(ann, val, classes)
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    by_id = {c["id"]: c["name"] for c in cats}
    assert {r["name"]: by_id[r["category_id"]] for r in summary["categories"]} == {"car": "car", "truck": "truck"}
    assert [r["label"] for r in summary["categories"]] == [0, 1]
    assert {row["name"] for row in summary["per_class"]} == {"car", "truck"}
    # the training label of every val target is the label of its name
    target = val.load_target(0)
    names = [classes.names[int(lab)] for lab in target["labels"]]
    expected = [by_id[cat_of_box[k % len(cat_of_box)]] for k in range(len(BOXES))]
    assert names == [n for n in expected if n in classes.names]
    if len(cats) == 3:
        assert match.not_trained == [{"category_id": 2, "name": "bus", "num_boxes": 3}]
        assert summary["classes_not_trained"] == match.not_trained


def test_case_only_difference_matches_with_a_warning(tmp_path, caplog):
    classes = _train_classes(tmp_path)
    img_dir, ann = _split(tmp_path, "val", [{"id": 1, "name": "Car"}, {"id": 2, "name": "truck"}], [1, 2])
    val = CocoDetection(img_dir, ann, check_images=False)
    with caplog.at_level(logging.WARNING, logger="src.data.coco_dataset"):
        match = val.use_classes(classes)
    assert match.case_only == [("car", "Car")] and "ignoring case" in caplog.text
    assert _perfect_ap(ann, val, classes)["AP"] == pytest.approx(1.0)


def test_training_class_missing_from_val_is_listed_and_its_detections_unscored(tmp_path):
    classes = _train_classes(tmp_path)
    img_dir, ann = _split(tmp_path, "val", [{"id": 5, "name": "car"}], [5])
    val = CocoDetection(img_dir, ann, check_images=False)
    match = val.use_classes(classes)
    assert match.missing == [{"label": 1, "name": "truck"}]
    summary = _perfect_ap(ann, val, classes, extra_label=1)
    assert summary["AP"] == pytest.approx(1.0) and summary["unscored_detections"] == 3
    assert summary["classes_missing"] == [{"label": 1, "name": "truck"}]
    assert [r["category_id"] for r in summary["categories"]] == [5]


def test_a_json_without_any_training_class_and_duplicate_names_are_errors(tmp_path):
    classes = ClassList(("car", "truck"), (1, 2))
    with pytest.raises(ClassMismatchError, match="none of its categories"):
        match_classes(classes, [{"id": 1, "name": "dog"}])
    with pytest.raises(ClassMismatchError, match="same class name"):
        match_classes(classes, [{"id": 1, "name": "car"}, {"id": 2, "name": "Car"}])
    assert ClassList.from_records(classes.to_records()) == classes


@pytest.mark.parametrize("boxes, fixes", [
    # 3 zero-width boxes of 12 (4 per image): dropped on both sides
    ([(2, 3, 20, 15), (30, 20, 0, 20), (5, 25, 12, 18), (40, 2, 10, 10)], {"degenerate_dropped": 3}),
    # partly outside: clipped on both sides
    ([(2, 3, 20, 15), (50, 30, 30, 30), (-5, 25, 12, 18), (40, 2, 10, 10)], {"clipped": 6}),
    # numbers written as strings: parsed on both sides
    ([("2", "3", "20.5", "15"), (30, 20, 25, 20), (5, 25, 12, 18), (40, 2, 10, 10)], {"parsed_strings": 3}),
])
def test_training_and_evaluation_clean_boxes_the_same_way(tmp_path, boxes, fixes):
    classes = _train_classes(tmp_path)
    img_dir, ann = _split(tmp_path, "val", TRAIN_CATS, [1, 2], boxes=boxes)
    val = CocoDetection(img_dir, ann, check_images=False)
    val.use_classes(classes)
    # what training sees: the same boxes the evaluator keeps
    summary = _perfect_ap(ann, val, classes) if "degenerate_dropped" not in fixes else None
    if summary is None:   # a zero-width box is not predictable: predict the kept ones
        gt = json.loads(open(ann).read())
        gt["annotations"] = [a for a in gt["annotations"] if a["bbox"][2] > 0]
        kept = tmp_path / "kept.json"
        kept.write_text(json.dumps(gt))
        summary = _perfect_ap(kept, val, classes)
    assert summary["AP"] == pytest.approx(1.0)
    for key, value in fixes.items():
        assert summary["gt_fixes"][key] == value and val.box_stats[key] == value


@pytest.mark.parametrize("bad", ["10,5", None, True, [1, 2]])
def test_a_bbox_value_that_is_not_a_number_names_the_annotation_and_file(tmp_path, bad):
    img_dir, ann = _split(tmp_path, "val", TRAIN_CATS, [1, 2])
    gt = json.loads(open(ann).read())
    gt["annotations"][5]["bbox"][1] = bad
    open(ann, "w").write(json.dumps(gt))
    with pytest.raises(AnnotationError) as e:
        CocoDetection(img_dir, ann, check_images=False)
    assert "annotation id 6" in str(e.value) and "ann.json" in str(e.value) and "not a number" in str(e.value)


def test_normalised_boxes_are_an_error_that_names_the_convention(tmp_path):
    norm = [(x / 100, y / 100, w / 100, h / 100) for x, y, w, h in BOXES]
    folder = tmp_path / "n"
    folder.mkdir()
    images = [img_entry(i, 640, 480) for i in (1, 2)]
    anns = [ann_entry(k + 1, 1 + k % 2, 1, b) for k, b in enumerate(norm * 2)]
    img_dir, ann = write_coco(folder, images, anns, TRAIN_CATS, make_files=False)
    with pytest.raises(AnnotationError, match=r"look normalised .*\[x, y, width, height\] in pixels"):
        CocoDetection(img_dir, ann, check_images=False)


def test_corner_coordinate_boxes_are_an_error_that_names_the_convention(tmp_path):
    xyxy = [(30, 20, 60, 44), (40, 10, 62, 40), (35, 30, 63, 47), (20, 25, 50, 46)]   # x2, y2 as "w, h"
    img_dir, ann = _split(tmp_path, "x", TRAIN_CATS, [1, 2], boxes=xyxy)
    with pytest.raises(AnnotationError, match=r"look like corner coordinates.*width = x2 - x1"):
        CocoDetection(img_dir, ann, check_images=False)


def test_transforms_that_remove_every_box_stop_before_training(tmp_path):
    img_dir, ann = _split(tmp_path, "t", TRAIN_CATS, [1, 2], make_files=True)
    drop_all = lambda image, target: (image, {**target, "boxes": target["boxes"][:0]})   # noqa: E731
    ds = CocoDetection(img_dir, ann, transforms=drop_all)
    with pytest.raises(ConfigError, match=r"remove every box of the 3 images checked.*4 boxes before"):
        check_boxes_survive_transforms(ds, "train_dataloader")
    check_boxes_survive_transforms(CocoDetection(img_dir, ann, transforms=lambda i, t: (i, t)), "train_dataloader")


class _Loader:
    def __init__(self, dataset):
        self.dataset = dataset


def test_images_in_both_train_and_val_are_a_warning_with_count_and_names(tmp_path, capsys):
    img_dir, ann = _split(tmp_path, "same", TRAIN_CATS, [1, 2])
    train, val = CocoDetection(img_dir, ann, check_images=False), CocoDetection(img_dir, ann, check_images=False)
    classes = prepare_val_data(_Loader(val), train.classes, _Loader(train))
    assert classes == train.classes
    err = capsys.readouterr().out
    assert "3 image file(s) are in both the training and the validation set (e.g. 001.jpg, 002.jpg, 003.jpg)" in err
    other_dir, other = _split(tmp_path, "other", TRAIN_CATS, [1, 2])
    assert check_leakage(_Loader(train), _Loader(CocoDetection(other_dir, other, check_images=False))) == []
