"""COCO annotation json: reading, validation, and the clean-up both training and evaluation rely on.

One place for what a COCO json from any tool (labelme2coco, CVAT, Label Studio, hand-written) must
satisfy and for the two repairs that must be identical in training and evaluation:

* annotation ids are renumbered 1..N for evaluation: the COCO evaluators use the annotation id as the
  "matched" marker, where 0 also means "unmatched", so a json whose ids start at 0 (labelme2coco)
  silently turns the detection matched to annotation 0 into a false positive;
* a missing ``area`` is filled from the box clipped to the image (what the dataset uses for training),
  so AP_small / AP_medium / AP_large use the same size buckets as training.

Errors are ``AnnotationError`` (a ``DataError``): they name the json file and the image / annotation id.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Dict, List, Optional

import numpy as np
import torch
from torchvision.ops import box_convert

from src.core.yaml_utils import DataError

__all__ = ["AnnotationError", "AnnotationFileNotFoundError", "load_coco_json", "check_image_entries",
           "xywh_to_xyxy", "clip_to_image", "parse_bboxes", "clean_boxes", "check_box_convention",
           "AnnotationColumns", "annotation_columns", "EvalGroundTruth", "coco_gt_for_eval", "gc_paused"]


class AnnotationError(DataError):
    """The annotation json is unreadable or inconsistent; the message names the file and the fix."""


class AnnotationFileNotFoundError(AnnotationError, FileNotFoundError):
    """The annotation json does not exist."""


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector while a large json becomes objects: parsing creates millions of
    containers and no cycle, and the collections they trigger double the time of ``json.load`` (7.6 s -> 3.0 s
    for 2M annotations, bench/data_bench.py --scale)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_coco_json(ann_file: str, allow_unlabelled: bool = False) -> dict:
    """Read and validate the top level of a COCO annotation file; errors name the file.

    A json without an ``annotations`` list is refused (it would train on nothing and evaluate to nothing)
    unless ``allow_unlabelled`` (an image list for inference only; the result then has no 'annotations').
    """
    if not os.path.isfile(ann_file):
        raise AnnotationFileNotFoundError(f"annotation file {ann_file!r} not found; check the dataset's ann_file "
                                          "key (for the synthetic set run `make data` first)")
    try:
        with open(ann_file, "r", encoding="utf-8") as f, gc_paused():
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"annotation file {ann_file!r} is not valid json ({e}); regenerate or fix it") from e
    if not isinstance(coco, dict):
        raise AnnotationError(f"annotation file {ann_file!r}: expected a json object with 'images', "
                              f"'annotations' and 'categories', got {type(coco).__name__}")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise AnnotationError(f"annotation file {ann_file!r}: missing or invalid {key!r} list")
    if "annotations" not in coco:
        if not allow_unlabelled:
            raise AnnotationError(
                f"annotation file {ann_file!r} has no 'annotations' list: it would train on nothing and evaluate "
                f"to nothing. Export the json with its annotations, or, for an unlabelled image list used for "
                f"inference only, set allow_unlabelled: true in the dataset section")
    elif not isinstance(coco["annotations"], list):
        raise AnnotationError(f"annotation file {ann_file!r}: 'annotations' must be a list, "
                              f"got {type(coco['annotations']).__name__}")
    return coco


def check_image_entries(images: List[dict], ann_file: str) -> None:
    """Every image entry has an id, file_name and a positive integer width/height; ids are unique."""
    seen = set()
    for img in images:
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise AnnotationError(f"annotation file {ann_file!r}: image entry {img.get('id', img)!r} "
                                      f"has no {key!r}")
        for key in ("width", "height"):
            v = img[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0:
                raise AnnotationError(f"annotation file {ann_file!r}: image id {img['id']} has {key} {v!r}; "
                                      f"expected a positive integer (pixels of the image file)")
        if img["id"] in seen:
            raise AnnotationError(f"annotation file {ann_file!r}: image id {img['id']} appears twice")
        seen.add(img["id"])


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """[n, 4] COCO (x, y, width, height) -> [n, 4] float64 XYXY; rows with a non-finite value become zeros."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(xywh).all(axis=1)
    return box_convert(torch.from_numpy(np.where(finite[:, None], xywh, 0.0)), "xywh", "xyxy").numpy()


def clip_to_image(xyxy: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """Clip [n, 4] XYXY boxes to their image: x to [0, width], y to [0, height]; ``wh`` is [n, 2]."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    return np.clip(xyxy, 0.0, np.concatenate([wh, wh], axis=1))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _where(ann_file: str, ann: dict) -> str:
    return f"annotation file {ann_file!r}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"


def parse_bboxes(anns: List[dict], ann_file: str) -> tuple:
    """The [n, 4] float64 COCO bboxes (x, y, width, height) of `anns`, and how many had numeric strings.

    A bbox must be a list of 4 numbers; a string that is a plain number ("10.5") is parsed and counted
    (a warning at start), anything else ("10,5", null, true, a nested list) is an AnnotationError naming
    the file, the annotation id and the image id. NaN / inf stay (dropped by `clean_boxes`, counted)."""
    xywh, string_rows = _parse_bboxes(anns, ann_file)
    return xywh, int(string_rows.sum())


def _parse_bboxes(anns: List[dict], ann_file: str) -> tuple:
    """`parse_bboxes` with the [n] bool mask of the boxes written with strings."""
    boxes = [a.get("bbox") for a in anns]
    string_rows = np.zeros(len(anns), dtype=bool)
    for row, (a, b) in enumerate(zip(anns, boxes)):
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            raise AnnotationError(f"{_where(ann_file, a)} has bbox {b!r}; expected [x, y, width, height] "
                                  f"(4 numbers, pixels)")
        if all(type(v) in (int, float) for v in b):
            continue
        for v in b:
            ok = type(v) in (int, float)
            if isinstance(v, str):
                try:
                    float(v.strip())
                    ok = "," not in v
                except ValueError:
                    ok = False
            if not ok:
                raise AnnotationError(f"{_where(ann_file, a)} has bbox {b!r}: {v!r} is not a number; write "
                                      f"[x, y, width, height] as numbers (a decimal point, not a comma)")
        string_rows[row] = True
    xywh = np.array([[float(v) for v in b] for b in boxes] if string_rows.any() else boxes, dtype=np.float64)
    return xywh.reshape(len(anns), 4), string_rows


def _number_or_nan(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


@dataclass
class AnnotationColumns:
    """A json's annotations as columns, in file order (`annotation_columns`)."""
    image_index: np.ndarray     # [n] int64: position of the annotation's image in the json's images
    category_index: np.ndarray  # [n] int64: position of its category in the categories sorted by id
    xywh: np.ndarray            # [n, 4] float64 COCO boxes as written (NaN / inf kept for `clean_boxes`)
    iscrowd: np.ndarray         # [n] int64
    area: np.ndarray            # [n] float64 json area; NaN where missing or not a number
    string_rows: np.ndarray     # [n] bool: the box was written with numeric strings (parsed)

    def __len__(self) -> int:
        return len(self.image_index)

    def of_images(self, keep: np.ndarray) -> "AnnotationColumns":
        """The annotations of the images where ``keep`` ([images] bool) is True, image positions renumbered
        among the kept images (what is left when skip_corrupt leaves images out)."""
        rows = keep[self.image_index]
        position = np.cumsum(keep) - 1
        return AnnotationColumns(position[self.image_index[rows]], self.category_index[rows], self.xywh[rows],
                                 self.iscrowd[rows], self.area[rows], self.string_rows[rows])


_NUMBER_TYPES = frozenset({int, float})


def _lookup(anns: List[dict], key: str, index: Dict) -> Optional[np.ndarray]:
    """[n] index[ann[key]] for every annotation (a C-level pass), or None when one is missing or unknown."""
    try:
        return np.fromiter(map(index.__getitem__, map(itemgetter(key), anns)), dtype=np.int64, count=len(anns))
    except (KeyError, TypeError):   # missing / unknown / unhashable: the per-annotation check says which
        return None


def _optional_column(anns: List[dict], key: str, default) -> list:
    """[ann.get(key, default) for ann in anns], in a C-level pass."""
    try:
        return list(map(itemgetter(key), anns))
    except KeyError:
        return list(map(methodcaller("get", key, default), anns))


def _check_references(anns: List[dict], image_index: Dict, category_index: Dict, ann_file: str) -> None:
    """Every annotation's image_id is in 'images' and its category_id in 'categories' (the first that is not
    raises, naming it)."""
    for ann in anns:
        if ann.get("image_id") not in image_index:
            raise AnnotationError(f"annotation file {ann_file!r}: annotation id {ann.get('id')} refers to "
                                  f"image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in category_index:
            raise AnnotationError(f"annotation file {ann_file!r}: annotation id {ann.get('id')} (image id "
                                  f"{ann.get('image_id')}) has category_id {ann.get('category_id')!r}, which is not "
                                  f"in 'categories' (ids {list(category_index)}); add the category or fix the "
                                  f"annotation")


def _plain_bboxes(anns: List[dict]) -> Optional[np.ndarray]:
    """[n, 4] float64 when every bbox is a list of 4 ints / floats (C-level passes, no per-box Python code);
    None otherwise (`parse_bboxes` then parses the strings or names the bad annotation)."""
    n = len(anns)
    try:
        boxes = list(map(itemgetter("bbox"), anns))
        if n and not (np.fromiter(map(len, boxes), dtype=np.int64, count=n) == 4).all():
            return None
    except (KeyError, TypeError):   # no bbox, or one without a length (null, a number)
        return None
    if not set(map(type, chain.from_iterable(boxes))) <= _NUMBER_TYPES:   # strings, bools, nested lists, null
        return None
    return np.fromiter(chain.from_iterable(boxes), dtype=np.float64, count=4 * n).reshape(n, 4)


def annotation_columns(anns: List[dict], image_index: Dict, category_index: Dict, ann_file: str) -> AnnotationColumns:
    """The annotations of a json as columns, validated; every error names the file and the annotation.

    image_index: image id -> position in 'images'; category_index: category id -> position in the categories
    sorted by id (its keys in that order). Each column is read in one C-level pass over the annotation dicts
    (``map`` + ``np.fromiter``); only a column with something unusual in it (a string bbox, a missing area,
    an unknown id) takes the per-annotation path, which parses it or raises the error naming the annotation."""
    n = len(anns)
    image = _lookup(anns, "image_id", image_index)
    category = _lookup(anns, "category_id", category_index)
    if image is None or category is None:
        _check_references(anns, image_index, category_index, ann_file)   # raises for the first bad annotation
        image = np.array([image_index[a["image_id"]] for a in anns], dtype=np.int64)
        category = np.array([category_index[a["category_id"]] for a in anns], dtype=np.int64)
    xywh, string_rows = _plain_bboxes(anns), np.zeros(n, dtype=bool)
    if xywh is None:
        xywh, string_rows = _parse_bboxes(anns, ann_file)
    crowd = _optional_column(anns, "iscrowd", 0)
    if set(map(type, crowd)) <= {int, bool}:
        iscrowd = np.fromiter(crowd, dtype=np.int64, count=n)
    else:
        iscrowd = np.array([int(v) for v in crowd], dtype=np.int64)
    area = _optional_column(anns, "area", None)
    kinds = set(map(type, area))
    if kinds <= _NUMBER_TYPES:
        area = np.fromiter(area, dtype=np.float64, count=n)
    elif kinds <= {int, float, type(None)}:
        area = np.array(area, dtype=np.float64)   # None -> NaN, as _number_or_nan
    else:
        area = np.array([_number_or_nan(v) for v in area], dtype=np.float64)
    return AnnotationColumns(image.reshape(n), category.reshape(n), xywh.reshape(n, 4), iscrowd.reshape(n),
                             area.reshape(n), string_rows)


def clean_boxes(xywh: np.ndarray, wh: np.ndarray) -> tuple:
    """The one box clean-up of training targets and evaluation ground truth.

    xywh [n, 4] COCO boxes, wh [n, 2] their image's (width, height). Returns (xyxy [n, 4] clipped to the
    image, keep [n] bool, masks {'nonfinite', 'clipped', 'degenerate'} of [n] bool): a box with a non-finite
    value or no area after clipping is dropped (keep False), a box partly outside is clipped."""
    finite = np.isfinite(xywh).all(axis=1)
    xyxy = xywh_to_xyxy(xywh)
    clipped = clip_to_image(xyxy, wh)
    was_clipped = finite & (clipped != xyxy).any(axis=1)
    degenerate = finite & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    keep = finite & ~degenerate
    return clipped, keep, {"nonfinite": ~finite, "clipped": was_clipped, "degenerate": degenerate}


def check_box_convention(xywh: np.ndarray, wh: np.ndarray, ann_file: str) -> None:
    """Refuse boxes written in another convention than COCO's [x, y, width, height] in pixels.

    - normalised (every coordinate within [0, 1.5] on images larger than 32 px): they would all vanish
      after resizing and the run would train on empty targets;
    - [x1, y1, x2, y2] (most boxes extend past their image as x, y, w, h but fit it as x1, y1, x2, y2).
    xywh [n, 4] (finite, non-crowd boxes), wh [n, 2]."""
    finite = np.isfinite(xywh).all(axis=1)
    if not finite.all():
        xywh, wh = xywh[finite], wh[finite]
    if len(xywh) == 0:
        return
    fix = "COCO bbox is [x, y, width, height] in pixels of the image file; convert the json"
    if xywh.max() <= 1.5 and xywh.min() >= 0 and np.median(wh.min(axis=1)) > 32:
        raise AnnotationError(f"annotation file {ann_file!r}: all {len(xywh)} boxes lie within [0, 1.5] on images of "
                              f"about {int(np.median(wh[:, 0]))}x{int(np.median(wh[:, 1]))} px: they look normalised "
                              f"(0-1). {fix} (multiply x and width by the image width, y and height by its height)")
    tol = 1.0
    past = (xywh[:, 0] + xywh[:, 2] > wh[:, 0] + tol) | (xywh[:, 1] + xywh[:, 3] > wh[:, 1] + tol)
    if past.mean() <= 0.5:
        return
    xywh, wh = xywh[past], wh[past]
    fits_xyxy = ((xywh[:, 2] > xywh[:, 0]) & (xywh[:, 3] > xywh[:, 1])
                 & (xywh[:, 2] <= wh[:, 0] + tol) & (xywh[:, 3] <= wh[:, 1] + tol))
    if fits_xyxy.mean() > 0.9:
        raise AnnotationError(f"annotation file {ann_file!r}: {int(past.sum())} of {len(past)} boxes extend past their "
                              f"image as [x, y, width, height] but fit it as [x1, y1, x2, y2]: the boxes look like "
                              f"corner coordinates. {fix} (width = x2 - x1, height = y2 - y1)")


GT_FIX_KEYS = ("nonfinite_dropped", "degenerate_dropped", "clipped", "parsed_strings")


def coco_gt_for_eval(gt: dict, ann_file: str = "ground truth") -> tuple:
    """A copy of a COCO ground-truth dict the evaluators score correctly whatever tool wrote it, and the
    box fixes made ({GT_FIX_KEYS: count}).

    Boxes go through the same clean-up as training targets (`parse_bboxes`, `clean_boxes`): clipped to
    the image, non-finite and degenerate ones dropped (crowd regions included), numeric strings parsed.
    Annotation ids become 1..N in file order (the original id is kept as ``source_id``; COCO's
    evaluators read id 0 as "unmatched"); a missing or non-numeric ``area`` becomes the area of the
    clipped box (as in training); a missing ``iscrowd`` becomes 0. Images and categories are unchanged.
    """
    out = {k: v for k, v in gt.items() if k != "annotations"}
    anns = [dict(a) for a in gt.get("annotations") or []]
    sizes = {img["id"]: (img.get("width", 0), img.get("height", 0)) for img in gt.get("images", [])}
    xywh, strings = parse_bboxes(anns, ann_file)
    wh = np.array([sizes.get(a.get("image_id"), (0, 0)) for a in anns], dtype=np.float64).reshape(-1, 2)
    xyxy, keep, masks = clean_boxes(xywh, wh)
    fixes = {"nonfinite_dropped": int(masks["nonfinite"].sum()), "degenerate_dropped": int(masks["degenerate"].sum()),
             "clipped": int((masks["clipped"] & keep).sum()), "parsed_strings": strings}
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    kept = []
    for a, row, ok, box_area in zip(anns, xyxy.tolist(), keep.tolist(), area.tolist()):
        if not ok:
            continue
        a["bbox"] = [row[0], row[1], row[2] - row[0], row[3] - row[1]]
        if not _is_number(a.get("area")):
            a["area"] = box_area
        kept.append(a)
    for new_id, a in enumerate(kept, start=1):
        a["source_id"] = a.get("id")
        a["id"] = new_id
        a.setdefault("iscrowd", 0)
    out["annotations"] = kept
    out["images"] = copy.deepcopy(gt.get("images", []))
    out["categories"] = copy.deepcopy(gt.get("categories", []))
    return out, fixes


@dataclass
class EvalGroundTruth:
    """The evaluation ground truth of a json that a dataset has already read and cleaned, as columns
    (`CocoDetection.eval_ground_truth`): `CocoEvaluator` builds its COCO index from it without reading the
    json again. The same content as `coco_gt_for_eval` of that json (boxes through `clean_boxes`, crowd
    regions kept, areas filled from the clipped box, annotation ids 1..N in file order), less the annotation
    keys box evaluation does not read (segmentation, the original id).

    images: [{id, file_name, width, height}]; categories: the json's own, as written. The columns hold the
    m kept annotations in file order: image_index [m] (into images), category_id [m], xywh [m, 4] float64,
    area [m] float64, iscrowd [m]. fixes: the box fixes of the whole json ({GT_FIX_KEYS: count}).
    """
    source: str
    labelled: bool
    images: List[dict]
    categories: List[dict]
    image_index: np.ndarray
    category_id: np.ndarray
    xywh: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    fixes: Dict[str, int]

    def boxes_per_category(self, image_ids) -> Dict[int, int]:
        """category id -> number of non-crowd boxes on the images `image_ids` (every category listed)."""
        wanted = np.fromiter((img["id"] in image_ids for img in self.images), dtype=bool, count=len(self.images))
        counted = (self.iscrowd == 0) & wanted[self.image_index]
        ids, counts = np.unique(self.category_id[counted], return_counts=True)
        out = {c["id"]: 0 for c in self.categories}
        out.update(zip(ids.tolist(), counts.tolist()))
        return out

    def to_coco_dict(self) -> dict:
        """The COCO dict the evaluators index (one small dict per annotation; built with the collector paused)."""
        image_ids = [img["id"] for img in self.images]
        with gc_paused():
            anns = [{"id": k, "image_id": image_ids[i], "category_id": c, "bbox": box, "area": a, "iscrowd": z}
                    for k, (i, c, box, a, z) in enumerate(zip(self.image_index.tolist(), self.category_id.tolist(),
                                                              self.xywh.tolist(), self.area.tolist(),
                                                              self.iscrowd.tolist()), start=1)]
        return {"images": [dict(img) for img in self.images], "categories": copy.deepcopy(self.categories),
                "annotations": anns}
