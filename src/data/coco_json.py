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
           "xywh_to_xyxy", "clip_to_image", "parse_bboxes", "clean_boxes", "check_box_convention",
           "coco_gt_for_eval"]


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


def _where(ann_file: str, ann: dict) -> str:
    return f"annotation file {ann_file!r}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"


def parse_bboxes(anns: List[dict], ann_file: str) -> tuple:
    """The [n, 4] float64 COCO bboxes (x, y, width, height) of `anns`, and how many had numeric strings.

    A bbox must be a list of 4 numbers; a string that is a plain number ("10.5") is parsed and counted
    (a warning at start), anything else ("10,5", null, true, a nested list) is an AnnotationError naming
    the file, the annotation id and the image id. NaN / inf stay (dropped by `clean_boxes`, counted)."""
    boxes = [a.get("bbox") for a in anns]
    strings = 0
    for a, b in zip(anns, boxes):
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
        strings += 1
    xywh = np.array([[float(v) for v in b] for b in boxes] if strings else boxes, dtype=np.float64)
    return xywh.reshape(len(anns), 4), strings


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
    xywh, wh = xywh[finite], wh[finite]
    if len(xywh) == 0:
        return
    fix = "COCO bbox is [x, y, width, height] in pixels of the image file; convert the json"
    if np.all((xywh >= 0) & (xywh <= 1.5)) and np.median(wh.min(axis=1)) > 32:
        raise AnnotationError(f"annotation file {ann_file!r}: all {len(xywh)} boxes lie within [0, 1.5] on images of "
                              f"about {int(np.median(wh[:, 0]))}x{int(np.median(wh[:, 1]))} px: they look normalised "
                              f"(0-1). {fix} (multiply x and width by the image width, y and height by its height)")
    tol = 1.0
    past = (xywh[:, 0] + xywh[:, 2] > wh[:, 0] + tol) | (xywh[:, 1] + xywh[:, 3] > wh[:, 1] + tol)
    fits_xyxy = ((xywh[:, 2] > xywh[:, 0]) & (xywh[:, 3] > xywh[:, 1])
                 & (xywh[:, 2] <= wh[:, 0] + tol) & (xywh[:, 3] <= wh[:, 1] + tol))
    if past.mean() > 0.5 and fits_xyxy[past].mean() > 0.9:
        raise AnnotationError(f"annotation file {ann_file!r}: {int(past.sum())} of {len(xywh)} boxes extend past their "
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
