"""DAIR-V2X-I (single-infrastructure-side) camera labels -> COCO detection json.

Input layout (as released)::

    ROOT/image/{id}.jpg                 1920x1080 roadside images
    ROOT/label/camera/{id}.json         list of objects: {"type": "Car", "2d_box": {"xmin": ..., ...}, ...}
    ROOT/data_info.json                 list of frames: {"image_path": "image/000000.jpg",
                                        "label_camera_std_path": "label/camera/000000.json", ...}
    split json (optional)               {"train": [ids], "val": [ids], "test": [ids]}

Numbers in the labels may be strings; they are parsed with float. Type names are matched
case-insensitively. Classes (COCO ids 1..8): Car, Truck, Van, Bus, Pedestrian, Cyclist,
Motorcyclist, Trafficcone. Barrowlist is merged into Cyclist; Tricyclist is dropped. Ignore types
become ``iscrowd=1`` annotations (COCO evaluation then ignores detections of the same category
there): PedestrianIgnore -> Pedestrian, CarIgnore -> Car, and OtherIgnore, Unknown_movable,
Unknown_unmovable -> Car (most ignore regions in roadside data are parked or partly visible
vehicles; a documented choice, see docs/data.md). Boxes are clipped to the image; degenerate ones
(zero/negative size after clipping, non-finite) are dropped and counted; unknown types are counted
per type and skipped.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from PIL import Image

CLASSES = ("Car", "Truck", "Van", "Bus", "Pedestrian", "Cyclist", "Motorcyclist", "Trafficcone")
CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
_CLASS_ID = {name.lower(): i + 1 for i, name in enumerate(CLASSES)}

# lower-case DAIR type -> (COCO class name, iscrowd)
TYPE_MAP: Dict[str, Tuple[str, int]] = {
    **{name.lower(): (name, 0) for name in CLASSES},
    "barrowlist": ("Cyclist", 0),
    "pedestrianignore": ("Pedestrian", 1),
    "carignore": ("Car", 1),
    "otherignore": ("Car", 1),
    "unknown_movable": ("Car", 1),
    "unknown_unmovable": ("Car", 1),
}
DROPPED_TYPES = frozenset({"tricyclist"})
SPLITS = ("train", "val", "test")


@dataclass
class ConversionReport:
    """Counts gathered while converting (per split and overall)."""
    images: Dict[str, int] = field(default_factory=dict)
    annotations: Dict[str, Counter] = field(default_factory=dict)  # split -> Counter(class name)
    crowd: Dict[str, Counter] = field(default_factory=dict)  # split -> Counter(class name)
    dropped_types: Counter = field(default_factory=Counter)  # e.g. tricyclist
    unknown_types: Counter = field(default_factory=Counter)
    degenerate: int = 0
    clipped: int = 0
    ids_not_in_split: int = 0
    split_ids_missing: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for split in self.images:
            ann, crowd = self.annotations[split], self.crowd[split]
            lines.append(f"[{split}] images={self.images[split]} annotations={sum(ann.values())} "
                         f"(+{sum(crowd.values())} iscrowd)")
            lines.append("  per class: " + ", ".join(f"{c}={ann.get(c, 0)}" for c in CLASSES))
            if crowd:
                lines.append("  iscrowd per class: " + ", ".join(f"{c}={n}" for c, n in sorted(crowd.items())))
        lines.append(f"dropped types: {dict(self.dropped_types) or 'none'}; degenerate boxes dropped: "
                     f"{self.degenerate}; boxes clipped to the image: {self.clipped}")
        if self.unknown_types:
            lines.append(f"UNKNOWN types skipped: {dict(self.unknown_types)}")
        if self.ids_not_in_split:
            lines.append(f"frames in data_info.json but in no split: {self.ids_not_in_split}")
        for split, n in self.split_ids_missing.items():
            if n:
                lines.append(f"split {split!r}: {n} ids not found in data_info.json (skipped)")
        return "\n".join(lines)


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid json ({e})") from e


def frame_id(entry: dict, where: str) -> str:
    """The frame id of a data_info entry: the image file's stem (``image/000123.jpg`` -> ``000123``)."""
    if "image_path" not in entry:
        raise KeyError(f"{where}: entry {entry!r} has no 'image_path'")
    return os.path.splitext(os.path.basename(entry["image_path"]))[0]


def label_path(entry: dict, fid: str) -> str:
    """Relative camera-label path of a frame (``label_camera_std_path``, else ``label/camera/{id}.json``)."""
    return entry.get("label_camera_std_path") or entry.get("label_camera_path") or f"label/camera/{fid}.json"


def convert_box(box: dict, width: int, height: int) -> Tuple[Optional[List[float]], bool]:
    """DAIR ``2d_box`` {xmin, ymin, xmax, ymax} (numbers or strings) -> (COCO [x, y, w, h] clipped to the
    image or None if degenerate, whether it was clipped)."""
    try:
        x0, y0, x1, y1 = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError):
        return None, False
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, False
    cx0, cx1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    cy0, cy1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, clipped
    return [cx0, cy0, cx1 - cx0, cy1 - cy0], clipped


def make_splits(ids: List[str], split_json: Optional[str], seed: int, val_fraction: float,
                report: ConversionReport) -> Dict[str, List[str]]:
    """Split frame ids: from ``split_json`` if given, else a seeded (train, val) shuffle."""
    if split_json is not None:
        split = _load_json(split_json, "split json")
        if not isinstance(split, dict) or not any(k in split for k in SPLITS):
            raise ValueError(f"split json {split_json!r} must map some of {SPLITS} to lists of ids")
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise ValueError(f"split json {split_json!r}: unknown split name(s) {unknown}; use {SPLITS}")
        known = set(ids)
        out = {}
        for name in SPLITS:
            if name not in split:
                continue
            wanted = [str(i) for i in split[name]]
            out[name] = [i for i in wanted if i in known]
            report.split_ids_missing[name] = len(wanted) - len(out[name])
        report.ids_not_in_split = len(known - {i for v in out.values() for i in v})
        return out
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n_val = int(round(len(shuffled) * val_fraction))
    return {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}


def convert_dairv2x(root: str, out_dir: str, split_json: Optional[str] = None, seed: int = 0,
                    val_fraction: float = 0.2) -> ConversionReport:
    """Write ``out_dir/instances_{split}.json`` for each split; image ``file_name`` is relative to
    ``root/image`` (the dataset's ``img_folder``). Returns the counts."""
    info_path = os.path.join(root, "data_info.json")
    data_info = _load_json(info_path, "DAIR-V2X-I frame list")
    if not isinstance(data_info, list) or not data_info:
        raise ValueError(f"{info_path!r} must be a non-empty list of frame entries")
    frames: Dict[str, dict] = {}
    for i, entry in enumerate(data_info):
        fid = frame_id(entry, f"{info_path}[{i}]")
        if fid in frames:
            raise ValueError(f"{info_path!r}: frame id {fid!r} appears twice")
        frames[fid] = entry

    report = ConversionReport()
    splits = make_splits(list(frames), split_json, seed, val_fraction, report)
    numeric = all(fid.isdigit() for fid in frames)
    image_ids = {fid: (int(fid) if numeric else k + 1) for k, fid in enumerate(sorted(frames))}
    os.makedirs(out_dir, exist_ok=True)

    for split, ids in splits.items():
        images, annotations = [], []
        ann_counter, crowd_counter = Counter(), Counter()
        for fid in ids:
            entry = frames[fid]
            rel_image = entry["image_path"]
            image_file = os.path.join(root, rel_image)
            if not os.path.isfile(image_file):
                raise FileNotFoundError(f"image {image_file!r} (frame {fid}) listed in {info_path!r} is missing")
            with Image.open(image_file) as im:
                width, height = im.size
            file_name = os.path.relpath(os.path.join(root, rel_image), os.path.join(root, "image"))
            images.append({"id": image_ids[fid], "file_name": file_name, "width": width, "height": height,
                           "dair_id": fid})
            labels = _load_json(os.path.join(root, label_path(entry, fid)), f"camera label of frame {fid}")
            if not isinstance(labels, list):
                raise ValueError(f"camera label of frame {fid} must be a list of objects")
            for obj in labels:
                type_name = str(obj.get("type", "")).strip().lower()
                if type_name in DROPPED_TYPES:
                    report.dropped_types[type_name] += 1
                    continue
                if type_name not in TYPE_MAP:
                    report.unknown_types[obj.get("type", "<missing>")] += 1
                    continue
                bbox, clipped = convert_box(obj.get("2d_box", {}), width, height)
                report.clipped += int(clipped)
                if bbox is None:
                    report.degenerate += 1
                    continue
                cls, crowd = TYPE_MAP[type_name]
                annotations.append({"id": len(annotations) + 1, "image_id": image_ids[fid],
                                    "category_id": _CLASS_ID[cls.lower()], "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": crowd, "dair_type": obj.get("type")})
                (crowd_counter if crowd else ann_counter)[cls] += 1
        coco = {"info": {"description": f"DAIR-V2X-I camera labels ({split})", "source": os.path.abspath(root)},
                "images": images, "annotations": annotations, "categories": [dict(c) for c in CATEGORIES]}
        with open(os.path.join(out_dir, f"instances_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(coco, f)
        report.images[split] = len(images)
        report.annotations[split] = ann_counter
        report.crowd[split] = crowd_counter
    return report
