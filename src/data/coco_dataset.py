"""COCO-format detection dataset.

The annotation json is read once, at construction: each annotation field is taken in one C-level pass
over the parsed dicts (`coco_json.annotation_columns`), then category ids are remapped to contiguous
labels ``0..C-1`` in sorted category-id order, crowd boxes are left out of the training targets
(the evaluation ground truth, `eval_ground_truth`, keeps them), boxes are clipped to the image and
degenerate ones dropped, all as array operations over every annotation at once. Per-image boxes live in
flat arrays with offsets, so workers get a cheap copy and ``__getitem__`` only slices.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image
from torchvision import tv_tensors

from src.core.registry import build, register
from src.core.yaml_utils import DataError
from src.data.classes import ClassList, ClassMatch, ClassMismatchError, match_classes
from src.data.coco_json import (AnnotationColumns, AnnotationError, EvalGroundTruth, annotation_columns,
                                check_box_convention, check_image_entries, clean_boxes, gc_paused, load_coco_json)
from src.data.epoch_sync import sync_epoch
from src.data.image_io import (HeaderCache, apply_orientation, default_header_cache_dir, orientation_to_apply,
                               probe_headers, to_rgb_uint8)

logger = logging.getLogger(__name__)


class CorruptImageError(DataError, RuntimeError):
    """An image file is missing, unreadable or does not match its json entry."""


@register()
class CocoDetection(Dataset):
    """Images and targets from a COCO json.

    ``__getitem__`` returns ``(image, target)``: image a ``tv_tensors.Image`` uint8 [3, H, W] (before
    transforms), target a dict with ``boxes`` (``tv_tensors.BoundingBoxes`` XYXY absolute pixels,
    [n, 4] float32), ``labels`` int64 [n] (contiguous 0..C-1), ``image_id`` int, ``orig_size``
    int64 [2] = (w, h) of the file, ``area`` float32 [n] (json area, original pixels) and
    ``iscrowd`` int64 [n] (all 0: crowd boxes are not training targets). Transforms run last.

    Args:
        img_folder: folder that image ``file_name`` entries are relative to.
        ann_file: COCO json.
        transforms: a transform module/callable ``(image, target) -> (image, target)``, or a
            ``{type: Compose, ...}`` dict built with the registry, or None.
        skip_corrupt: False (default): a missing / unreadable image, or one whose size does not match
            the json, is an error. True: such images are left out at construction (listed in
            ``skipped_at_start``, one warning), and a file that fails to decode later is replaced by the
            next readable index (deterministic), counted in ``num_skipped`` and logged once per file.
        num_classes: the model's class count (shared top-level key); must be >= the number of
            categories in the json. None: use the json's count.
        allow_unlabelled: accept a json without an ``annotations`` list (an image list for inference
            only; the trainer refuses it for training and evaluation). Default False: such a json is an
            error, since it would train on nothing without a warning.
        check_images: read every image header at construction (in parallel; header only) so that
            missing, unreadable or mis-sized files are reported before training starts. False defers
            the check to the first load of each image.
        header_cache: where the headers read by the check are cached, keyed by path, size and mtime, so
            that a second start opens no unchanged file (`src.data.image_io.HeaderCache`): "auto" (default)
            ``$XDG_CACHE_HOME/dset-rtdetr/image_headers`` (``~/.cache/...`` without the variable), a folder,
            or false / null for no cache. A stale or malformed entry is read again, never trusted.

    EXIF orientation is applied when the json's width/height match the displayed (rotated) size and
    not when they match the stored one (see ``src.data.image_io.orientation_to_apply``).
    """

    __inject__ = ["transforms"]
    __share__ = ["num_classes"]

    def __init__(self, img_folder: str, ann_file: str, transforms: Any = None, skip_corrupt: bool = False,
                 num_classes: Optional[int] = None, allow_unlabelled: bool = False, check_images: bool = True,
                 header_cache: Union[str, bool, None] = "auto"):
        if not (header_cache is None or isinstance(header_cache, (bool, str, os.PathLike))):
            raise ValueError(f"dataset header_cache: expected 'auto', a folder, or false / null for no cache, got "
                             f"{header_cache!r}")
        self.header_cache = header_cache
        self.img_folder = str(img_folder)
        self.ann_file = str(ann_file)
        self.skip_corrupt = bool(skip_corrupt)
        if isinstance(transforms, dict):
            import src.data.transforms  # noqa: F401  (registers the transform ops the spec names)
            transforms = build(transforms, where="dataset.transforms")
        self.transforms = transforms
        self.epoch = 0
        self.num_skipped = 0
        self.skipped_at_start: List[dict] = []
        self._warned_corrupt: set = set()
        self._warned_values: set = set()

        with gc_paused():   # millions of new containers and no cycle: collections would only slow the start
            self._read_json(allow_unlabelled, num_classes, check_images)

    def _read_json(self, allow_unlabelled: bool, num_classes: Optional[int], check_images: bool) -> None:
        """Read the json into the per-image arrays, check it (and the image headers); the parsed json is
        freed when this returns."""
        coco = load_coco_json(self.ann_file, allow_unlabelled=allow_unlabelled)
        self.labelled = "annotations" in coco
        images, categories = coco["images"], coco["categories"]
        if not images:
            raise AnnotationError(f"annotation file {self.ann_file!r} lists no images; the dataset would be empty")
        if not categories:
            raise AnnotationError(f"annotation file {self.ann_file!r} lists no categories")
        check_image_entries(images, self.ann_file)

        categories = sorted(categories, key=lambda c: c["id"])
        self._json_categories = [dict(c) for c in categories]   # as written, for the evaluation ground truth
        self.categories: List[dict] = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]
        try:  # this json's own classes (labels in id order); `use_classes` maps it to training's by name
            self.classes = ClassList.from_categories(categories, where=f"annotation file {self.ann_file!r}")
        except ClassMismatchError as e:
            raise AnnotationError(str(e)) from None
        self.class_match = ClassMatch(dict(enumerate(self.classes.category_ids)))
        self.category_ids: List[int] = [int(c["id"]) for c in categories]
        self.category_names: List[str] = [str(c.get("name", c["id"])) for c in categories]
        self.label_to_category_id: Dict[int, int] = dict(enumerate(self.category_ids))
        self.category_id_to_label: Dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self.num_dataset_classes = len(self.category_ids)
        if num_classes is not None and int(num_classes) < self.num_dataset_classes:
            raise ValueError(f"num_classes={num_classes} is smaller than the {self.num_dataset_classes} categories "
                             f"in {self.ann_file!r}; set the top-level `num_classes` key to at least "
                             f"{self.num_dataset_classes}")
        self.num_classes = int(num_classes) if num_classes is not None else self.num_dataset_classes

        self.image_infos: List[dict] = [
            {"id": img["id"], "file_name": img["file_name"], "width": int(img["width"]), "height": int(img["height"]),
             "orientation": None}
            for img in images]
        self.image_ids: List[int] = [img["id"] for img in self.image_infos]
        image_index = {img_id: i for i, img_id in enumerate(self.image_ids)}
        # every annotation is validated first: json errors before file errors
        columns = annotation_columns(coco.get("annotations", []), image_index, self.category_id_to_label,
                                     self.ann_file)
        del coco, images, categories   # the parsed json is freed here, before the array work
        self._index_annotations(columns)
        if check_images:
            self._check_image_files(columns)

    # ------------------------------------------------------------------ image files
    def _skip_hint(self) -> str:
        return "" if self.skip_corrupt else "; or set skip_corrupt: true in the dataset section to leave it out"

    def _header_cache(self) -> Optional[HeaderCache]:
        if self.header_cache is None or self.header_cache is False:
            return None
        auto = self.header_cache is True or self.header_cache == "auto"
        folder = default_header_cache_dir() if auto else os.fspath(self.header_cache)
        return HeaderCache.for_dataset(folder, self.ann_file, self.img_folder)

    def _check_image_files(self, columns: AnnotationColumns) -> None:
        """Read every image header (parallel): missing / unreadable / mis-sized files are an error now, or
        with ``skip_corrupt`` left out of the data set (annotations included) with one warning. Also decides
        each image's EXIF orientation from the json size."""
        paths = [self.image_path(i) for i in range(len(self))]
        cache = self._header_cache()
        headers = probe_headers(paths, cache=cache)
        if cache is not None:
            logger.info("%s: %d image headers, %d read, %d unchanged from the cache %s", self.ann_file, len(paths),
                        len(paths) - cache.hits, cache.hits, cache.file)
        problems = []
        for info, path, (header, problem) in zip(self.image_infos, paths, headers):
            if header is not None:
                info["orientation"], problem = orientation_to_apply(header, (info["width"], info["height"]))
            if problem is not None:
                problems.append({"image_id": info["id"], "file": path, "problem": problem})
        if not problems:
            return
        lines = [f"image file {p['file']!r} (image id {p['image_id']}) {p['problem']}" for p in problems[:5]]
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        if not self.skip_corrupt:
            fix = ("fix the json's width/height (or the file)" if all("json says" in p["problem"] for p in problems)
                   else f"check img_folder ({self.img_folder!r}) and the files")
            raise CorruptImageError(f"{self.ann_file!r}: {len(problems)} of {len(self)} images cannot be used{more}:\n  "
                                    + "\n  ".join(lines) + f"\n{fix}, or set skip_corrupt: true in the dataset "
                                    "section to leave them out")
        bad = {p["image_id"] for p in problems}
        if len(bad) == len(self):
            raise CorruptImageError(f"{self.ann_file!r}: all {len(self)} images are missing, unreadable or do not "
                                    f"match the json (skip_corrupt is on, nothing would be left):\n  " + "\n  ".join(lines))
        self.skipped_at_start = problems
        logger.warning("%s: skip_corrupt is on: leaving out %d of %d images (and their annotations)%s:\n  %s",
                       self.ann_file, len(problems), len(self), more, "\n  ".join(lines))
        keep = np.array([info["id"] not in bad for info in self.image_infos], dtype=bool)
        self.image_infos = [info for info in self.image_infos if info["id"] not in bad]
        self.image_ids = [info["id"] for info in self.image_infos]
        self._index_annotations(columns.of_images(keep), first=False)

    # ------------------------------------------------------------------ indexing
    def _index_annotations(self, columns: AnnotationColumns, first: bool = True) -> None:
        """The flat per-image arrays of the annotation columns (array operations only). ``first``: the json's
        first indexing (checks the box convention, logs the fixes, records the json's ``gt_fixes``); False
        when skip_corrupt re-indexes without the images it left out."""
        n = len(columns)
        img_idx, xywh, strings = columns.image_index, columns.xywh, int(columns.string_rows.sum())
        labels, iscrowd, area_json = columns.category_index, columns.iscrowd, columns.area
        sizes = np.array([[im["width"], im["height"]] for im in self.image_infos], dtype=np.float64).reshape(-1, 2)

        crowd = iscrowd != 0
        wh = sizes[img_idx] if n else np.zeros((0, 2))
        if first:
            check_box_convention(xywh[~crowd], wh[~crowd], self.ann_file)
        clipped, usable, fixes = clean_boxes(xywh, wh)   # the same clean-up as the evaluation ground truth
        keep = ~crowd & usable

        self.box_stats = {
            "annotations": int(n),
            "crowd_excluded": int(crowd.sum()),
            "nonfinite_dropped": int((~crowd & fixes["nonfinite"]).sum()),
            "clipped": int((keep & fixes["clipped"]).sum()),
            "degenerate_dropped": int((~crowd & fixes["degenerate"]).sum()),
            "parsed_strings": int(strings),
            "kept": int(keep.sum()),
        }
        problems = {k: v for k, v in self.box_stats.items()
                    if k in ("nonfinite_dropped", "clipped", "degenerate_dropped", "parsed_strings") and v}
        if problems and first:
            logger.warning("%s: fixed boxes %s (of %d annotations; %d crowd excluded, %d kept)", self.ann_file,
                           problems, n, self.box_stats["crowd_excluded"], self.box_stats["kept"])
        elif first:
            logger.info("%s: %d annotations, %d crowd excluded from targets, %d kept", self.ann_file, n,
                        self.box_stats["crowd_excluded"], self.box_stats["kept"])

        box_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        area = np.where(np.isfinite(area_json), area_json, box_area)
        order = np.argsort(img_idx[keep], kind="stable")
        self._boxes = clipped[keep][order].astype(np.float32)
        self._labels = labels[keep][order]
        self._category_of_box = np.asarray(self.category_ids, dtype=np.int64)[self._labels]  # the json's own labels
        self._area = area[keep][order].astype(np.float32)
        counts = np.bincount(img_idx[keep], minlength=len(self.image_infos))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # the evaluation ground truth (`eval_ground_truth`): every usable box, crowd regions included, file order
        ok = clipped[usable]
        self._eval_columns = {"image_index": img_idx[usable].astype(np.int32), "label": labels[usable].astype(np.int32),
                              "xywh": np.concatenate([ok[:, :2], ok[:, 2:] - ok[:, :2]], axis=1),
                              "area": area[usable], "iscrowd": iscrowd[usable]}
        if first:   # the fixes of the whole json, as `coco_gt_for_eval` counts them
            self.gt_fixes = {"nonfinite_dropped": int(fixes["nonfinite"].sum()),
                             "degenerate_dropped": int(fixes["degenerate"].sum()),
                             "clipped": int((fixes["clipped"] & usable).sum()), "parsed_strings": int(strings)}

    def eval_ground_truth(self) -> EvalGroundTruth:
        """The evaluation ground truth of this json from what construction parsed (no second read of the file):
        the boxes of the kept images after the clean-up shared with training, crowd regions included."""
        cols = self._eval_columns
        images = [{"id": i["id"], "file_name": i["file_name"], "width": i["width"], "height": i["height"]}
                  for i in self.image_infos]
        category_id = np.asarray(self.category_ids, dtype=np.int64)[cols["label"]]
        return EvalGroundTruth(self.ann_file, self.labelled, images, copy.deepcopy(self._json_categories),
                               cols["image_index"], category_id, cols["xywh"], cols["area"], cols["iscrowd"],
                               dict(self.gt_fixes))

    def boxes_per_image(self) -> np.ndarray:
        """[len(self)] number of training-target boxes of each image (after the clean-up)."""
        return np.diff(self._offsets)

    def use_classes(self, classes: ClassList) -> ClassMatch:
        """Label this json's boxes with the training classes, matched by name (`src.data.classes`).

        Boxes of a category training does not know leave the targets (reported, with their count); the
        labels, ``label_to_category_id`` and ``category_id_to_label`` become the training ones. Returns the
        match (also kept as ``class_match``)."""
        cats, counts = np.unique(self._category_of_box, return_counts=True)
        match = match_classes(classes, self.categories, dict(zip(cats.tolist(), counts.tolist())),
                              where=f"annotation file {self.ann_file!r}")
        ids = np.array(self.category_ids, dtype=np.int64)
        lut = np.full(len(ids), -1, dtype=np.int64)
        for label, cid in match.label_to_category_id.items():
            lut[self.category_ids.index(cid)] = label
        labels = lut[np.searchsorted(ids, self._category_of_box)] if len(self._category_of_box) else self._labels
        keep = labels >= 0
        image_of_box = np.repeat(np.arange(len(self.image_infos)), self.boxes_per_image())
        self._boxes, self._labels = self._boxes[keep], labels[keep]
        self._area, self._category_of_box = self._area[keep], self._category_of_box[keep]
        counts = np.bincount(image_of_box[keep], minlength=len(self.image_infos))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.classes, self.class_match = classes, match
        self.label_to_category_id = dict(match.label_to_category_id)
        self.category_id_to_label = match.category_id_to_label
        self.category_names = list(classes.names)
        self.num_dataset_classes = len(classes)
        for line in match.report(f"annotation file {self.ann_file!r}"):
            logger.warning("%s", line)
        return match

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.image_infos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.transforms is not None and hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_folder, self.image_infos[index]["file_name"])

    def load_image(self, index: int) -> tv_tensors.Image:
        """Decode image ``index`` as uint8 RGB [3, H, W] (every PIL mode scaled to 8 bits, EXIF orientation
        applied when the json says so); CorruptImageError names file and image id."""
        info = self.image_infos[index]
        path = self.image_path(index)
        if not os.path.isfile(path):
            raise CorruptImageError(f"image file {path!r} (image id {info['id']}) is missing; check img_folder "
                                    f"({self.img_folder!r}){self._skip_hint()}")
        try:
            with Image.open(path) as pil:
                rgb, note = to_rgb_uint8(pil)  # decodes the whole file
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            truncated = " (the file is truncated)" if "truncated" in str(e) else ""
            raise CorruptImageError(f"image file {path!r} (image id {info['id']}) cannot be decoded{truncated} "
                                    f"({e}); replace it{self._skip_hint()}") from e
        if note is not None and index not in self._warned_values:
            self._warned_values.add(index)
            logger.warning("image file %r (image id %s): %s", path, info["id"], note)
        rgb = apply_orientation(rgb, info["orientation"])
        h, w = rgb.shape[:2]
        if (w, h) != (info["width"], info["height"]):
            raise CorruptImageError(f"image file {path!r} (image id {info['id']}) is {w}x{h} but "
                                    f"{self.ann_file!r} says {info['width']}x{info['height']}; fix the json"
                                    f"{self._skip_hint()}")
        return tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())

    def load_target(self, index: int) -> dict:
        info = self.image_infos[index]
        s, e = self._offsets[index], self._offsets[index + 1]
        n = int(e - s)
        return {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(self._boxes[s:e].copy()), format="XYXY",
                                              canvas_size=(info["height"], info["width"])),
            "labels": torch.from_numpy(self._labels[s:e].copy()),
            "image_id": info["id"],
            "orig_size": torch.tensor([info["width"], info["height"]], dtype=torch.int64),
            "area": torch.from_numpy(self._area[s:e].copy()),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }

    def _readable_index(self, index: int) -> Tuple[int, tv_tensors.Image]:
        """The first readable image at ``index, index+1, ...`` (wrapping) when skipping corrupt files."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return i, self.load_image(i)
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                self.num_skipped += 1
                if i not in self._warned_corrupt:
                    self._warned_corrupt.add(i)
                    logger.warning("skip_corrupt is on: skipping image index %d, using the next readable one "
                                   "(%d skipped so far in this process): %s", i, self.num_skipped, e)
        raise CorruptImageError(f"no readable image in {self.img_folder!r} for {self.ann_file!r}: "
                                f"all {len(self)} files are missing or corrupt")

    def __getitem__(self, index):
        """``index``: an int, or an ``EpochIndex`` from a training loader (src/data/epoch_sync.py)."""
        index, image = self._readable_index(sync_epoch(self, index))
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def extra_repr(self) -> str:
        return (f"img_folder={self.img_folder}, ann_file={self.ann_file}, images={len(self)}, "
                f"classes={self.num_dataset_classes}, skip_corrupt={self.skip_corrupt}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
