"""DAIR-V2X-I (single-infrastructure-side) camera labels -> COCO detection json.

Input layout (as released)::

    ROOT/image/{id}.jpg                 1920x1080 roadside images
    ROOT/label/camera/{id}.json         list of objects: {"type": "Car", "2d_box": {"xmin": ..., ...}, ...}
    ROOT/data_info.json                 list of frames: {"image_path": "image/000000.jpg",
                                        "label_camera_std_path": "label/camera/000000.json", ...}
    split json (optional)               {"train": [ids], "val": [ids], "test": [ids]}

Numbers in the labels may be strings; they are parsed with float. Type names are matched
case-insensitively. Classes (COCO ids 1..8): Car, Truck, Van, Bus, Pedestrian, Cyclist,
Motorcyclist, Trafficcone. Barrowlist (and the devkit's spelling Barrow) is merged into Cyclist;
Tricyclist is dropped. Ignore types become ``iscrowd=1`` annotations (COCO evaluation then ignores
detections of the same category there): PedestrianIgnore -> Pedestrian, CarIgnore -> Car, and
OtherIgnore, Unknown_movable, Unknown_unmovable (and the devkit's Unknowns_movable,
Unknowns_unmovable) -> Car (most ignore regions in roadside data are parked or partly visible
vehicles; a documented choice, see docs/data.md). Boxes are clipped to the image; degenerate ones
(zero/negative size after clipping, non-finite) are dropped and counted; unknown types are counted
per type and skipped.

Without a split file the frames are split in whole blocks of consecutive frame ids of one camera
(``contiguous_blocks``), so near-identical neighbouring frames never land in both train and val. The
official split is ``data/split_datas/single-infrastructure-split-data.json`` of the DAIR-V2X devkit.
Everything is validated before anything is written, and the outputs are renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from src.core.yaml_utils import DataError
from src.data.image_io import probe_headers

CLASSES = ("Car", "Truck", "Van", "Bus", "Pedestrian", "Cyclist", "Motorcyclist", "Trafficcone")
CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
_CLASS_ID = {name.lower(): i + 1 for i, name in enumerate(CLASSES)}

# lower-case DAIR type -> (COCO class name, iscrowd)
TYPE_MAP: Dict[str, Tuple[str, int]] = {
    **{name.lower(): (name, 0) for name in CLASSES},
    "barrowlist": ("Cyclist", 0),
    "barrow": ("Cyclist", 0),  # the devkit's other spelling of barrowlist
    "pedestrianignore": ("Pedestrian", 1),
    "carignore": ("Car", 1),
    "otherignore": ("Car", 1),
    "unknown_movable": ("Car", 1),
    "unknown_unmovable": ("Car", 1),
    "unknowns_movable": ("Car", 1),  # the devkit also accepts these spellings
    "unknowns_unmovable": ("Car", 1),
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
    missing_labels: List[str] = field(default_factory=list)  # frames skipped (skip_missing_labels)

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
        if self.missing_labels:
            lines.append(f"frames without a camera label file, skipped: {len(self.missing_labels)} "
                         f"(first: {', '.join(self.missing_labels[:5])})")
        return "\n".join(lines)


class DairConversionError(DataError):
    """The DAIR-V2X-I folder or split file cannot be converted; nothing was written."""


class DairFileNotFoundError(DairConversionError, FileNotFoundError):
    """A file the conversion needs does not exist."""


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DairFileNotFoundError(f"{what} {path!r} not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DairConversionError(f"{what} {path!r} is not valid json ({e})") from e


def frame_id(entry: dict, where: str) -> str:
    """The frame id of a data_info entry: the image file's stem (``image/000123.jpg`` -> ``000123``)."""
    if not isinstance(entry, dict) or "image_path" not in entry:
        raise DairConversionError(f"{where}: entry {entry!r} has no 'image_path'")
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


def _split_group(entry: dict) -> tuple:
    """Frames of one camera (as far as data_info says: intersection, camera ip / id) never share a block."""
    return tuple(str(entry.get(k, "")) for k in ("intersection_loc", "camera_ip", "camera_id"))


def contiguous_blocks(frames: Dict[str, dict], block_size: int) -> List[List[str]]:
    """Frame ids cut into blocks of up to ``block_size`` consecutive ids (sorted), one camera per block.

    Consecutive frames of a camera are near-identical; a split that keeps each block on one side keeps
    them out of train and val at the same time."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks: List[List[str]] = []
    by_group: Dict[tuple, List[str]] = {}
    for fid in sorted(frames):
        by_group.setdefault(_split_group(frames[fid]), []).append(fid)
    for group in sorted(by_group):
        ids = by_group[group]
        blocks += [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return blocks


def _check_split_ids(name: str, wanted: List[str], found: List[str], split_json: str, info_path: str,
                     known: List[str]) -> None:
    """An empty split, or one whose ids are mostly not in data_info.json, is an error naming the cause."""
    if not wanted:
        raise DairConversionError(f"split json {split_json!r}: split {name!r} is empty; remove it or fill it")
    if len(found) * 2 < len(wanted):
        sample = ", ".join(sorted(known)[:3])
        if name == "test" and not found:
            raise DairConversionError(
                f"split 'test' of {split_json!r}: none of its {len(wanted)} frame ids is in {info_path!r} (which has "
                f"{len(known)} frames, e.g. {sample}). Most likely the test frames are not part of your download "
                f"(the DAIR-V2X-I release ships train and val frames; the devkit split lists test ids too): convert "
                f"the others with --splits train val. Otherwise check that --root is the single-infrastructure-side "
                f"folder the split belongs to")
        raise DairConversionError(
            f"split {name!r} of {split_json!r}: {len(wanted) - len(found)} of its {len(wanted)} frame ids are not in "
            f"{info_path!r} (which has {len(known)} frames, e.g. {sample}). Likely causes: --root is not the "
            f"single-infrastructure-side folder the split belongs to, or the split file is for another part of "
            f"DAIR-V2X (use data/split_datas/single-infrastructure-split-data.json of the devkit); to convert only "
            f"some splits pass --splits train val")


def make_splits(frames: Dict[str, dict], split_json: Optional[str], seed: int, val_fraction: float,
                report: ConversionReport, info_path: str = "data_info.json", block_size: int = 50,
                splits: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """Split frame ids: from ``split_json`` if given, else a seeded (train, val) split of whole blocks of
    consecutive frames (``contiguous_blocks``). ``splits`` restricts the output to these split names."""
    ids = list(frames)
    if split_json is not None:
        split = _load_json(split_json, "split json")
        if not isinstance(split, dict) or not any(k in split for k in SPLITS):
            raise DairConversionError(f"split json {split_json!r} must map some of {SPLITS} to lists of ids")
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise DairConversionError(f"split json {split_json!r}: unknown split name(s) {unknown}; use {SPLITS}")
        names = [n for n in SPLITS if n in split and (splits is None or n in splits)]
        if splits is not None and set(splits) - set(names):
            raise DairConversionError(f"split json {split_json!r} has no split(s) {sorted(set(splits) - set(names))}; "
                                      f"it has {[n for n in SPLITS if n in split]}")
        known = set(ids)
        out = {}
        for name in names:
            wanted = [str(i) for i in split[name]]
            out[name] = [i for i in wanted if i in known]
            _check_split_ids(name, wanted, out[name], split_json, info_path, ids)
            report.split_ids_missing[name] = len(wanted) - len(out[name])
        seen: Dict[str, str] = {}
        for name in names:
            for i in (str(x) for x in split[name]):
                if i in seen and seen[i] != name:
                    shared = sorted({str(x) for x in split[name]} & {str(x) for x in split[seen[i]]})
                    raise DairConversionError(
                        f"split json {split_json!r}: splits {seen[i]!r} and {name!r} share {len(shared)} frame id(s) "
                        f"(e.g. {', '.join(shared[:3])}): an image in both would be trained on and evaluated. Fix the "
                        f"split file so that every id is in one split")
                seen.setdefault(i, name)
        report.ids_not_in_split = len(known - {i for v in out.values() for i in v})
        return out
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    blocks = contiguous_blocks(frames, block_size)
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    target = int(round(len(ids) * val_fraction))
    val: List[str] = []
    for b in order:  # whole blocks into val until it has its share
        if len(val) >= target:
            break
        val += blocks[b]
    val_set = set(val)
    out = {"train": sorted(i for i in ids if i not in val_set), "val": sorted(val)}
    for name, got in out.items():
        if not got:
            raise DairConversionError(f"{info_path!r}: the {name} split would be empty ({len(ids)} frames in "
                                      f"{len(blocks)} blocks of up to {block_size}, val_fraction={val_fraction}); "
                                      f"use a smaller --block-size or pass --split-json")
    return {n: v for n, v in out.items() if splits is None or n in splits}


def _atomic_write_json(obj, path: str) -> str:
    """Write ``obj`` to a temporary file next to ``path``; returns the temporary path (renamed later)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return tmp


def convert_dairv2x(root: str, out_dir: str, split_json: Optional[str] = None, seed: int = 0,
                    val_fraction: float = 0.2, block_size: int = 50, skip_missing_labels: bool = False,
                    splits: Optional[List[str]] = None) -> ConversionReport:
    """Write ``out_dir/instances_{split}.json`` for each split; image ``file_name`` is relative to
    ``root/image`` (the dataset's ``img_folder``). Returns the counts.

    Everything is read and checked before anything is written (splits, every image header, every label
    file), and the files are written to temporaries and renamed at the end: an error leaves ``out_dir`` as
    it was. A frame without its camera label file is an error (a broken download or a wrong --root),
    unless ``skip_missing_labels``: then it is left out of its split, counted and listed in the report.
    """
    info_path = os.path.join(root, "data_info.json")
    data_info = _load_json(info_path, "DAIR-V2X-I frame list")
    if not isinstance(data_info, list) or not data_info:
        raise DairConversionError(f"{info_path!r} must be a non-empty list of frame entries")
    frames: Dict[str, dict] = {}
    for i, entry in enumerate(data_info):
        fid = frame_id(entry, f"{info_path}[{i}]")
        if fid in frames:
            raise DairConversionError(f"{info_path!r}: frame id {fid!r} appears twice")
        frames[fid] = entry

    report = ConversionReport()
    split_ids = make_splits(frames, split_json, seed, val_fraction, report, info_path=info_path,
                            block_size=block_size, splits=splits)
    numeric = all(fid.isdigit() for fid in frames)
    image_ids = {fid: (int(fid) if numeric else k + 1) for k, fid in enumerate(sorted(frames))}

    # ---- read and check everything first
    used = sorted({fid for ids in split_ids.values() for fid in ids})
    headers = dict(zip(used, probe_headers([os.path.join(root, frames[f]["image_path"]) for f in used])))
    bad_images = [f"{os.path.join(root, frames[f]['image_path'])!r} (frame {f}) {problem}"
                  for f, (_, problem) in headers.items() if problem]
    if bad_images:
        raise DairConversionError(f"{len(bad_images)} image(s) listed in {info_path!r} cannot be used (nothing was "
                                  f"written): " + "; ".join(bad_images[:5]) + ". Images go into ROOT/image/ as in "
                                  f"the release; check --root")
    labels: Dict[str, list] = {}
    for fid in used:
        path = os.path.join(root, label_path(frames[fid], fid))
        if not os.path.isfile(path):
            report.missing_labels.append(fid)
            continue
        objs = _load_json(path, f"camera label of frame {fid}")
        if not isinstance(objs, list):
            raise DairConversionError(f"camera label {path!r} of frame {fid} must be a list of objects")
        labels[fid] = objs
    if report.missing_labels and not skip_missing_labels:
        first = report.missing_labels[0]
        raise DairConversionError(
            f"{len(report.missing_labels)} of {len(used)} frames have no camera label file (first: frame {first}, "
            f"expected {os.path.join(root, label_path(frames[first], first))!r}); nothing was written. Check --root "
            f"and the download, or pass --skip-missing-labels to leave those frames out (counted in the summary)")

    # ---- build every split in memory
    outputs = {}
    for split, ids in split_ids.items():
        images, annotations = [], []
        ann_counter, crowd_counter = Counter(), Counter()
        for fid in ids:
            if fid not in labels:
                continue  # skipped: no label file (skip_missing_labels)
            entry = frames[fid]
            header = headers[fid][0]
            width, height = header.width, header.height
            file_name = os.path.relpath(os.path.join(root, entry["image_path"]), os.path.join(root, "image"))
            images.append({"id": image_ids[fid], "file_name": file_name, "width": width, "height": height,
                           "dair_id": fid})
            for obj in labels[fid]:
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
        if not images:
            raise DairConversionError(f"split {split!r} has no frame left after leaving out frames without a label "
                                      f"file; nothing was written")
        outputs[split] = {"info": {"description": f"DAIR-V2X-I camera labels ({split})",
                                   "source": os.path.abspath(root)},
                          "images": images, "annotations": annotations, "categories": [dict(c) for c in CATEGORIES]}
        report.images[split] = len(images)
        report.annotations[split] = ann_counter
        report.crowd[split] = crowd_counter

    # ---- write: temporaries first, then rename them all
    os.makedirs(out_dir, exist_ok=True)
    tmps = {}
    try:
        for split, coco in outputs.items():
            tmps[split] = _atomic_write_json(coco, os.path.join(out_dir, f"instances_{split}.json"))
        for split, tmp in tmps.items():
            os.replace(tmp, os.path.join(out_dir, f"instances_{split}.json"))
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return report
