"""COCO box evaluation (AP, AP50, AP75, AP by size, AR, per-class AP).

Uses faster-coco-eval (C++ accumulate, same numbers as pycocotools) when importable, else
pycocotools. Detections are collected per image on every rank, gathered to rank 0, evaluated
there, and the summary is broadcast so every rank returns the same dict.

Usage::

    evaluator = CocoEvaluator(val_dataset.ann_file, label_to_category_id)
    for images, targets in loader:
        results = postprocess(model(images), orig_sizes)  # xyxy boxes in ORIGINAL pixels
        evaluator.update({t['image_id']: r for t, r in zip(targets, results)})
    summary = evaluator.summarize()
    print(format_table(summary))

In a run the ground truth is the one the val dataset parsed at construction (``evaluator_for``,
``CocoDetection.eval_ground_truth``): the json is read once per run, and the backend's COCO index is built
at the first evaluation on the rank that evaluates. A path or dict is read through ``coco_gt_for_eval``.
Both give the same ground truth: annotation ids are renumbered 1..N (COCO's
evaluators read id 0 as "unmatched", so ids starting at 0, as labelme2coco writes them, would silently
lower AP), a missing ``area`` is filled from the box, as in training, so AP by size is right, and the
boxes go through the training targets' clean-up (clipped, degenerate ones dropped; counts in ``gt_fixes``).
The model's labels are mapped to the json's categories by name (``src.data.classes``): pass the match's
``label_to_category_id``.

Undefined metrics (e.g. AP_small when no small ground-truth box exists, or the AP of a
category without ground truth; COCO reports -1) are NaN here.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from src.data.coco_json import EvalGroundTruth, coco_gt_for_eval, gc_paused
from src.misc.dist import all_gather_object, broadcast_object, is_main_process

__all__ = ["CocoEvaluator", "evaluator_for", "format_table", "available_backends", "METRIC_NAMES"]

METRIC_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]


def available_backends() -> List[str]:
    names = []
    try:
        import faster_coco_eval  # noqa: F401
        names.append("faster_coco_eval")
    except ImportError:
        pass
    try:
        import pycocotools  # noqa: F401
        names.append("pycocotools")
    except ImportError:
        pass
    return names


def _backend_classes(backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    raise ValueError(f"unknown COCO backend {backend!r}; valid: 'auto', 'faster_coco_eval', 'pycocotools'")


def _load_gt_dict(coco_gt) -> dict:
    if isinstance(coco_gt, (str, os.PathLike)):
        with open(coco_gt) as f:
            return json.load(f)
    if isinstance(coco_gt, dict):
        return copy.deepcopy(coco_gt)
    if hasattr(coco_gt, "dataset"):  # a COCO object of either library
        return copy.deepcopy(coco_gt.dataset)
    raise TypeError(f"CocoEvaluator: coco_gt must be an annotation file path, a COCO dict or a COCO "
                    f"object, got {type(coco_gt).__name__}")


_UNLABELLED = ("CocoEvaluator: the ground truth{} has no 'annotations' list; an unlabelled set (allow_unlabelled: "
               "true) can be used for inference, not evaluated")


def _describe(coco_gt) -> str:
    return f" {os.fspath(coco_gt)!r}" if isinstance(coco_gt, (str, os.PathLike)) else ""


def _mean_valid(x: np.ndarray) -> float:
    """Mean of entries > -1 (COCO's 'undefined' marker); NaN when there are none."""
    v = x[x > -1]
    return float(v.mean()) if v.size else float("nan")




class CocoEvaluator:
    """Collects detections and computes COCO box metrics.

    Args:
        coco_gt: annotation json path, COCO-format dict, a COCO object (pycocotools or
            faster-coco-eval), or the `EvalGroundTruth` a dataset already parsed (`evaluator_for`; the json
            is then not read again).
        label_to_category_id: contiguous model label -> COCO category id.
        backend: 'auto' (faster_coco_eval if importable, else pycocotools),
            'faster_coco_eval' or 'pycocotools'.
        image_ids: evaluate only these images (e.g. ``dataset.image_ids`` when ``skip_corrupt`` left some
            out); None: every image of the ground truth.
        unscored_labels: model labels with no category in this ground truth (training classes the json
            lacks, `src.data.classes.ClassMatch.missing`): their detections are dropped and counted
            (``unscored_detections``); any other label without a category is an error.
        categories: the mapping used, recorded in the summary as ``categories`` ([{label, name,
            category_id}], `ClassMatch.records`); default from label_to_category_id and the json's names.

    Only the categories label_to_category_id maps to are scored: a json category that no label maps to
    (a class training does not know) is left out of the AP, never scored as another class.
    """

    def __init__(self, coco_gt, label_to_category_id: Dict[int, int], backend: str = "auto",
                 image_ids: Optional[Iterable[int]] = None, unscored_labels: Iterable[int] = (),
                 categories: Optional[List[dict]] = None):
        if backend == "auto":
            backends = available_backends()
            if not backends:
                raise ImportError("CocoEvaluator needs faster-coco-eval or pycocotools: pip install faster-coco-eval")
            backend = backends[0]
        self.backend = backend
        self._COCO, self._COCOeval = _backend_classes(backend)
        if isinstance(coco_gt, EvalGroundTruth):   # parsed and cleaned by the dataset: no second read of the json
            if not coco_gt.labelled:
                raise ValueError(_UNLABELLED.format(f" {coco_gt.source!r}"))
            self._gt, self.gt_fixes = coco_gt, dict(coco_gt.fixes)
            images, gt_categories = coco_gt.images, coco_gt.categories
        else:
            gt = _load_gt_dict(coco_gt)
            if not isinstance(gt.get("annotations"), list):
                raise ValueError(_UNLABELLED.format(_describe(coco_gt)))
            # annotation ids renumbered 1..N (id 0 would be read as 'unmatched'), missing areas filled from the box
            gt, self.gt_fixes = coco_gt_for_eval(gt, os.fspath(coco_gt) if isinstance(coco_gt, (str, os.PathLike))
                                                 else "ground truth")
            self._gt = gt
            images, gt_categories = gt["images"], gt["categories"]
        self._coco_gt = None   # the backend's index, built at the first evaluation (`coco_gt`)
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in gt_categories}
        unknown = sorted(c for c in label_to_category_id.values() if c not in self.category_names)
        if unknown:
            raise KeyError(f"CocoEvaluator: label_to_category_id maps to category ids {unknown} that are not "
                           f"in the ground truth categories {sorted(self.category_names)}")
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.unscored_labels = {int(x) for x in unscored_labels} - set(self.label_to_category_id)
        self.categories = categories if categories is not None else [
            {"label": k, "name": self.category_names[v], "category_id": v}
            for k, v in sorted(self.label_to_category_id.items())]
        self.num_unscored = 0
        max_label = max(self.label_to_category_id, default=-1)
        self._lut = torch.full((max_label + 1,), -1, dtype=torch.int64)
        for k, v in self.label_to_category_id.items():
            self._lut[k] = v
        self.image_ids = {img["id"] for img in images}
        if image_ids is not None:
            wanted = {int(i) for i in image_ids}
            unknown = sorted(wanted - self.image_ids)
            if unknown:
                raise KeyError(f"CocoEvaluator: image_ids {unknown[:10]} are not in the ground-truth images")
            self.image_ids = wanted
        self.num_gt = self._num_gt(self.image_ids)
        self._dets: Dict[int, np.ndarray] = {}

    def _num_gt(self, image_ids) -> Dict[int, int]:
        """Non-crowd ground-truth boxes per category id in ``image_ids``."""
        if isinstance(self._gt, EvalGroundTruth):
            return self._gt.boxes_per_category(image_ids)
        out = {cid: 0 for cid in self.category_names}
        for a in self._gt["annotations"]:
            if not a.get("iscrowd", 0) and a["category_id"] in out and a["image_id"] in image_ids:
                out[a["category_id"]] += 1
        return out

    @property
    def coco_gt(self):
        """The backend's COCO index of the ground truth. Built at the first evaluation, once: only the rank that
        evaluates holds it, and a run that never evaluates never pays for it."""
        if self._coco_gt is None:
            gt = self._gt.to_coco_dict() if isinstance(self._gt, EvalGroundTruth) else self._gt
            with contextlib.redirect_stdout(io.StringIO()), gc_paused():
                self._coco_gt = self._COCO(gt) if self.backend == "faster_coco_eval" else self._COCO()
                if self.backend == "pycocotools":
                    self._coco_gt.dataset = gt
                    self._coco_gt.createIndex()
        return self._coco_gt

    def extra_summary(self, **fields) -> None:
        """Fields added to every summary (e.g. the class match's `classes_not_trained`)."""
        self._extra = dict(fields)

    def reset(self) -> None:
        """Forget the detections (the ground truth stays: one evaluator serves every evaluation of a run)."""
        self._dets = {}
        self.num_unscored = 0

    @staticmethod
    def results_to_host(results: List[dict]) -> List[dict]:
        """A batch's detections (``boxes`` [N_i, 4], ``scores`` [N_i], ``labels`` [N_i] per image, any device)
        on the host in ONE device-to-host copy (a copy per image and key is a device sync each on CUDA):
        packed as float64 rows [sum N_i, 6] (labels are small ints, exact in float64), copied, split.
        Returns float64 boxes / scores and int64 labels."""
        if not results or not all(torch.is_tensor(r["scores"]) for r in results):
            return results
        counts = [int(r["scores"].numel()) for r in results]  # shapes: no device read
        packed = torch.cat([torch.cat([r["boxes"].detach().reshape(-1, 4).to(torch.float64),
                                       r["scores"].detach().reshape(-1, 1).to(torch.float64),
                                       r["labels"].detach().reshape(-1, 1).to(torch.float64)], dim=1)
                            for r in results]).cpu()
        return [{"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5].to(torch.int64)}
                for p in packed.split(counts)]

    def update(self, results: Dict[int, dict]) -> None:
        """Add detections.

        Args:
            results: image_id -> {'boxes': [N, 4] xyxy in original-image pixels, 'scores': [N],
                'labels': [N] contiguous labels}. Tensors (any device) or arrays. An image given
                twice (e.g. DistributedSampler padding) keeps the last detections.
        """
        for image_id, r in results.items():
            image_id = int(image_id)
            if image_id not in self.image_ids:
                raise KeyError(f"CocoEvaluator.update: image_id {image_id} is not in the ground-truth images")
            boxes = torch.as_tensor(r["boxes"]).detach().cpu().to(torch.float64).reshape(-1, 4)
            scores = torch.as_tensor(r["scores"]).detach().cpu().to(torch.float64).reshape(-1)
            labels = torch.as_tensor(r["labels"]).detach().cpu().to(torch.int64).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"CocoEvaluator.update: image {image_id}: boxes/scores/labels lengths "
                                 f"{len(boxes)}/{len(scores)}/{len(labels)} differ")
            if self.unscored_labels:
                scored = ~torch.isin(labels, torch.tensor(sorted(self.unscored_labels), dtype=torch.int64))
                self.num_unscored += int((~scored).sum())
                boxes, scores, labels = boxes[scored], scores[scored], labels[scored]
            in_range = (labels >= 0) & (labels < len(self._lut))
            cats = torch.full_like(labels, -1)
            cats[in_range] = self._lut[labels[in_range]]
            bad = cats < 0
            if bad.any():
                raise KeyError(f"CocoEvaluator.update: image {image_id}: labels {sorted(set(labels[bad].tolist()))} "
                               f"have no entry in label_to_category_id {self.label_to_category_id}")
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            rows = torch.cat([torch.full((len(boxes), 1), float(image_id), dtype=torch.float64),
                              xywh, scores[:, None], cats[:, None].to(torch.float64)], dim=1)
            self._dets[image_id] = rows.numpy()

    def _evaluate(self, dets: np.ndarray, image_ids=None) -> dict:
        """COCOeval over ``image_ids`` (default: every image of the evaluator)."""
        image_ids = self.image_ids if image_ids is None else set(image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            if len(dets):
                coco_dt = self.coco_gt.loadRes(dets)
            else:  # an empty result set (loadRes cannot take one in pycocotools)
                coco_dt = self._COCO()
                coco_dt.dataset = {"images": list(self.coco_gt.dataset["images"]),
                                   "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
                                   "annotations": []}
                coco_dt.createIndex()
            coco_eval = self._COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(image_ids)
            coco_eval.params.catIds = sorted(set(self.label_to_category_id.values()))  # trained classes only
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.last_eval = coco_eval
        num_gt = self.num_gt if image_ids == self.image_ids else self._num_gt(image_ids)
        return summary_from_eval(coco_eval, self.category_names, num_gt)

    def summarize(self) -> dict:
        """Gather detections over ranks, evaluate on rank 0, broadcast the summary.

        Every rank must call this. Returns ``{metric: float for METRIC_NAMES, 'per_class':
        [{'category': id, 'name': str, 'num_gt': int, 'AP': float, 'AP50': float}, ...],
        'num_images': int, 'num_detections': int, 'backend': str}``.
        """
        merged: Dict[int, np.ndarray] = {}
        unscored = 0
        for part, dropped in all_gather_object((self._dets, self.num_unscored)):
            merged.update(part)
            unscored += dropped
        summary = None
        if is_main_process():
            dets = np.concatenate(list(merged.values()), axis=0) if merged else np.zeros((0, 7))
            # only the images that were run: one that failed to load (skip_corrupt) must not count as all-missed
            missing = sorted(self.image_ids - set(merged)) if merged else []
            summary = self._evaluate(dets, set(merged) if missing else None)
            if missing:
                summary["images_not_evaluated"] = {"count": len(missing), "first_ids": missing[:10]}
                print(f"warning: {len(missing)} of {len(self.image_ids)} val image(s) got no prediction in this "
                      f"evaluation (e.g. skipped as unreadable: skip_corrupt), first ids {missing[:10]}; AP is over "
                      f"the {len(merged)} evaluated images only", flush=True)
            summary.update(num_images=len(merged), num_detections=int(len(dets)), backend=self.backend,
                           categories=self.categories, gt_fixes=self.gt_fixes, unscored_detections=unscored,
                           **getattr(self, "_extra", {}))
        return broadcast_object(summary)


def summary_from_eval(coco_eval, category_names: Dict[int, str], num_gt: Dict[int, int]) -> dict:
    """Metrics from an accumulated COCOeval (either library), computed from its arrays.

    ``precision`` is [T iou, R recall, K class, A area, M maxDets], ``recall`` is [T, K, A, M];
    same definitions as ``COCOeval.summarize`` (AP/AR averaged over entries > -1).
    """
    p = coco_eval.params
    prec = np.asarray(coco_eval.eval["precision"])
    rec = np.asarray(coco_eval.eval["recall"])
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
    m_of = {d: i for i, d in enumerate(p.maxDets)}
    m = m_of[max(p.maxDets)]
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    t75 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.75)))
    a = area["all"]
    out = {
        "AP": _mean_valid(prec[:, :, :, a, m]),
        "AP50": _mean_valid(prec[t50, :, :, a, m]),
        "AP75": _mean_valid(prec[t75, :, :, a, m]),
        "AP_small": _mean_valid(prec[:, :, :, area["small"], m]),
        "AP_medium": _mean_valid(prec[:, :, :, area["medium"], m]),
        "AP_large": _mean_valid(prec[:, :, :, area["large"], m]),
    }
    for d in sorted(p.maxDets):
        out[f"AR{d}"] = _mean_valid(rec[:, :, a, m_of[d]])
    for lbl in ("small", "medium", "large"):
        out[f"AR_{lbl}"] = _mean_valid(rec[:, :, area[lbl], m])
    out["per_class"] = [
        {"category": int(cid), "name": category_names.get(cid, str(cid)), "num_gt": int(num_gt.get(cid, 0)),
         "AP": _mean_valid(prec[:, :, k, a, m]), "AP50": _mean_valid(prec[t50, :, k, a, m])}
        for k, cid in enumerate(p.catIds)
    ]
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(summary: Optional[dict]) -> str:
    """Markdown tables of the overall metrics and the per-class AP."""
    if not summary:
        return "(no evaluation summary)"
    metrics = [k for k in METRIC_NAMES if k in summary]
    lines = ["| " + " | ".join(metrics) + " |",
             "|" + "|".join("---:" for _ in metrics) + "|",
             "| " + " | ".join(_fmt(summary[k]) for k in metrics) + " |"]
    per_class = summary.get("per_class") or []
    if per_class:
        lines += ["", "| id | class | #gt | AP | AP50 |", "|---:|:---|---:|---:|---:|"]
        lines += [f"| {c['category']} | {c['name']} | {c.get('num_gt', '')} | {_fmt(c['AP'])} | "
                  f"{_fmt(c.get('AP50'))} |" for c in per_class]
    return "\n".join(lines)


def evaluator_for(dataset, classes) -> CocoEvaluator:
    """The evaluator of a val dataset whose labels are the training `classes` (`dataset.use_classes`),
    built once per run (the trainer resets it per evaluation): the ground truth the dataset parsed at
    construction (`CocoDetection.eval_ground_truth`, the json is not read again), its images (skip_corrupt
    may have left some out), the class match's mapping; training classes the json lacks are
    unscored, the json's classes training lacks are left out (both listed in every summary)."""
    match = dataset.class_match
    evaluator = CocoEvaluator(dataset.eval_ground_truth(), dataset.label_to_category_id, image_ids=dataset.image_ids,
                              unscored_labels=[m["label"] for m in match.missing], categories=match.records(classes))
    evaluator.extra_summary(classes_not_trained=match.not_trained, classes_missing=match.missing)
    return evaluator
