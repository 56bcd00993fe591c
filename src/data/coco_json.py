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

import copy
import json
import math
import os
from typing import List

import numpy as np
import torch
from torchvision.ops import box_convert

from src.core.yaml_utils import DataError

__all__ = ["AnnotationError", "AnnotationFileNotFoundError", "load_coco_json", "check_image_entries",
           "xywh_to_xyxy", "clip_to_image", "coco_gt_for_eval"]


class AnnotationError(DataError):
    """The annotation json is unreadable or inconsistent; the message names the file and the fix."""


class AnnotationFileNotFoundError(AnnotationError, FileNotFoundError):
    """The annotation json does not exist."""


def load_coco_json(ann_file: str, allow_unlabelled: bool = False) -> dict:
    """Read and validate the top level of a COCO annotation file; errors name the file.

    A json without an ``annotations`` list is refused (it would train on nothing and evaluate to nothing)
    unless ``allow_unlabelled`` (an image list for inference only; the result then has no 'annotations').
    """
    if not os.path.isfile(ann_file):
        raise AnnotationFileNotFoundError(f"annotation file {ann_file!r} not found; check the dataset's ann_file "
                                          "key (for the synthetic set run `make data` first)")
    try:
        with open(ann_file, "r", encoding="utf-8") as f:
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


def coco_gt_for_eval(gt: dict) -> dict:
    """A copy of a COCO ground-truth dict the evaluators score correctly whatever tool wrote it.

    Annotation ids become 1..N in file order (the original id is kept as ``source_id``); a missing or
    non-numeric ``area`` becomes the area of the box clipped to its image (as in training); a missing
    ``iscrowd`` becomes 0. Images and categories are unchanged.
    """
    out = {k: v for k, v in gt.items() if k != "annotations"}
    anns = [dict(a) for a in gt.get("annotations") or []]
    sizes = {img["id"]: (img.get("width", 0), img.get("height", 0)) for img in gt.get("images", [])}
    missing = [i for i, a in enumerate(anns) if not _is_number(a.get("area"))]
    if missing:
        xywh = np.array([[float(v) for v in anns[i].get("bbox", [0, 0, 0, 0])] for i in missing]).reshape(-1, 4)
        wh = np.array([sizes.get(anns[i].get("image_id"), (0, 0)) for i in missing], dtype=np.float64)
        xyxy = clip_to_image(xywh_to_xyxy(xywh), wh)
        area = (xyxy[:, 2] - xyxy[:, 0]).clip(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clip(min=0)
        for i, a in zip(missing, area.tolist()):
            anns[i]["area"] = a
    for new_id, a in enumerate(anns, start=1):
        a["source_id"] = a.get("id")
        a["id"] = new_id
        a.setdefault("iscrowd", 0)
    out["annotations"] = anns
    out["images"] = copy.deepcopy(gt.get("images", []))
    out["categories"] = copy.deepcopy(gt.get("categories", []))
    return out
