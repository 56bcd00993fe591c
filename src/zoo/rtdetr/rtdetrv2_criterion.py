"""RT-DETRv2 set-prediction loss: varifocal classification + L1/GIoU box regression.

Terms are computed for the final decoder layer, every intermediate decoder layer
(``aux_outputs``), the encoder proposals (``enc_aux_outputs``) and the denoising queries
(``dn_aux_outputs``). Hungarian matching assigns queries to targets for all but the denoising
queries, whose targets are known by construction (``dn_meta['dn_positive_idx']``).

A match is carried as three aligned int64 tensors of length N (the number of matched pairs in
the batch): ``batch_idx`` and ``query_idx`` locate the prediction, ``target_idx`` indexes the
targets of all images concatenated in batch order.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.core.registry import register
from src.misc.dist import all_reduce_sum, get_world_size
from src.misc.transfer import to_device
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_giou_loss

# loss name in ``losses`` -> keys of the terms it produces (each needs a weight in weight_dict)
LOSS_TERMS = {"vfl": ("loss_vfl",), "boxes": ("loss_bbox", "loss_giou")}
BOXES_WEIGHT_FORMATS = (None, "iou", "giou")
# torchvision's GIoU loss adds eps to the union and hull areas; its default 1e-7 biases the loss of
# a perfect small box by eps / area (5e-6 for a 0.2 x 0.2 box), 1e-9 keeps only the 0/0 guard.
GIOU_EPS = 1e-9


class Match(NamedTuple):
    """Matched (prediction, target) pairs of a batch; each field int64 [N]."""
    batch_idx: Tensor
    query_idx: Tensor
    target_idx: Tensor  # index into the batch's concatenated targets


def varifocal_loss(logits: Tensor, match: Match, labels: Tensor, scores: Tensor,
                   alpha: float, gamma: float) -> Tensor:
    """Varifocal loss summed over images, queries and classes (not normalised).

    logits [B, Q, C]; match fields [N]; labels int64 [N] class of each matched target;
    scores [N] target score of each matched pair (the IoU of the prediction with its target,
    no gradient). A matched (query, label) entry has target ``score`` and weight ``score``;
    every other entry has target 0 and weight ``alpha * sigmoid(logit) ** gamma`` (detached).
    Returns a float32 scalar: the logits are upcast first (under float16 autocast, ``sigmoid ** gamma``
    and the BCE would lose precision and underflow for confident queries).
    """
    logits = logits.float()
    where = (match.batch_idx, match.query_idx, labels)
    positive = torch.zeros_like(logits)
    positive[where] = torch.ones_like(scores, dtype=logits.dtype)  # a Python 1.0 would be a host-to-device copy
    target = torch.zeros_like(logits)
    target[where] = scores.detach().to(logits.dtype)
    prob = logits.detach().sigmoid()
    weight = alpha * prob.pow(gamma) * (1 - positive) + target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def box_regression_losses(src_boxes: Tensor, tgt_boxes: Tensor,
                          giou_weight: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Summed L1 and GIoU losses of paired boxes (not normalised).

    src_boxes, tgt_boxes [N, 4] normalised cxcywh; giou_weight [N] per-pair weight of the GIoU
    term or None. Returns {'loss_bbox': scalar, 'loss_giou': scalar}; both are 0 (still attached
    to the graph of ``src_boxes``) when N == 0.
    """
    loss_l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="sum")
    loss_giou = elementwise_giou_loss(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes), eps=GIOU_EPS)
    if giou_weight is not None:
        loss_giou = loss_giou * giou_weight
    return {"loss_bbox": loss_l1, "loss_giou": loss_giou.sum()}


def matched_box_quality(src_boxes: Tensor, tgt_boxes: Tensor, kind: str) -> Tensor:
    """IoU ('iou') or GIoU ('giou') of paired cxcywh boxes [N, 4] -> [N], without gradient."""
    src = box_cxcywh_to_xyxy(src_boxes.detach())
    tgt = box_cxcywh_to_xyxy(tgt_boxes)
    if kind == "iou":
        return elementwise_box_iou(src, tgt)
    if kind == "giou":
        return 1.0 - elementwise_giou_loss(src, tgt, eps=GIOU_EPS)
    raise ValueError(f"unknown box quality {kind!r}; use 'iou' or 'giou'")


def matches_from_indices(per_call: Sequence[Sequence], num_targets: Sequence[int], device) -> List[Match]:
    """Flatten the matcher's per-image output of several matched layers into one Match each, with one
    host-to-device copy for all of them (non-blocking: no device sync).

    per_call: for each matched layer, one (query_idx [k_b], target_idx [k_b]) int64 pair per image on the host
    (as HungarianMatcher returns them), target_idx local to the image; num_targets: number of targets per image.
    Returns Matches on ``device``.
    """
    offsets = torch.tensor([0] + list(num_targets[:-1]), dtype=torch.int64).cumsum(0)
    columns, lengths = [], []
    for indices in per_call:
        counts = [len(src) for src, _ in indices]
        batch_idx = torch.repeat_interleave(torch.arange(len(indices)), torch.tensor(counts, dtype=torch.int64),
                                            output_size=sum(counts))
        query_idx = torch.cat([src.long() for src, _ in indices])
        local_idx = torch.cat([tgt.long() for _, tgt in indices])
        columns.append(torch.stack([batch_idx, query_idx, local_idx + offsets[batch_idx]]))
        lengths.append(len(batch_idx))
    flat = to_device(torch.cat(columns, 1) if columns else torch.zeros(3, 0, dtype=torch.int64), device)
    return [Match(*part.unbind(0)) for part in flat.split(lengths, dim=1)]


def match_from_indices(indices: Sequence, num_targets: Sequence[int], device) -> Match:
    """``matches_from_indices`` of one matched layer."""
    return matches_from_indices([indices], num_targets, device)[0]


def match_from_denoising(dn_meta: Dict, num_targets: Sequence[int], device) -> Match:
    """Match of the denoising queries to the targets they were generated from.

    dn_meta['dn_positive_idx']: per image an int64 tensor [n_b * G] of positive denoising query
    indices, ordered group by group (group 0: targets 0..n_b-1, group 1: targets 0..n_b-1, ...);
    dn_meta['dn_num_group']: G. num_targets: n_b per image. Returns a Match on ``device``.
    """
    positive_idx, num_group = dn_meta["dn_positive_idx"], int(dn_meta["dn_num_group"])
    counts = [n * num_group for n in num_targets]
    got = [len(p) for p in positive_idx]
    if got != counts:
        raise ValueError(f"RTDETRCriterionv2: dn_meta['dn_positive_idx'] has {got} positive queries per "
                         f"image, but {num_targets} targets x dn_num_group={num_group} needs {counts}; "
                         f"the denoising queries were built from different targets than the loss got")
    total = sum(counts)
    counts_t = torch.tensor(counts, dtype=torch.int64)            # built on the host, copied once (no sync)
    sizes_t = torch.tensor(list(num_targets), dtype=torch.int64)
    batch_idx = torch.repeat_interleave(torch.arange(len(counts)), counts_t, output_size=total)
    position = torch.arange(total) - (counts_t.cumsum(0) - counts_t)[batch_idx]
    local_idx = position % sizes_t[batch_idx].clamp(min=1)  # group-major order: k -> k mod n_b
    target_idx = local_idx + (sizes_t.cumsum(0) - sizes_t)[batch_idx]
    host = torch.stack([batch_idx, target_idx])
    batch_t, target_t = to_device(host, device).unbind(0)  # host-built: no device sync
    query_idx = torch.cat([p.to(device) for p in positive_idx]).long()
    return Match(batch_t, query_idx, target_t)


def check_num_classes(logits: Tensor, num_classes: int, where: str) -> None:
    """Raise if logits [B, Q, C] do not have C == num_classes; ``where`` locates them in the outputs."""
    if logits.shape[-1] != num_classes:
        raise ValueError(f"RTDETRCriterionv2: outputs{where}['pred_logits'] has {logits.shape[-1]} classes, "
                         f"expected {num_classes} (criterion num_classes, 1 for class-agnostic encoder "
                         f"outputs); make the model's num_classes match the config's num_classes")


def batches_its_forward(matcher) -> bool:
    """Whether ``matcher.match_many`` may stand in for its ``forward``: it has one, defined in the class that
    defines ``forward`` or in a subclass of it. A matcher subclass that overrides only ``forward`` is called
    per layer (its inherited ``match_many`` would bypass the override)."""
    cls = type(matcher)
    if not callable(getattr(matcher, "match_many", None)):
        return False
    definer = lambda attr: next((c for c in cls.__mro__ if attr in vars(c)), object)  # noqa: E731
    return issubclass(definer("match_many"), definer("forward"))


@register()
class RTDETRCriterionv2(nn.Module):
    """RT-DETRv2 loss.

    Args:
        matcher: callable (outputs with pred_logits/pred_boxes, targets) -> {'indices': [...]}
            as returned by HungarianMatcher.
        weight_dict: weight of every produced term: 'loss_vfl' for 'vfl', 'loss_bbox' and
            'loss_giou' for 'boxes' (RT-DETRv2: 1, 5, 2). The same weight applies to the
            aux/enc/dn copies of a term. Missing or unused keys are an error.
        losses: subset of ['vfl', 'boxes'].
        alpha, gamma: varifocal weighting of the negatives, ``alpha * p ** gamma`` (our config:
            0.75, 2.0).
        num_classes: number of foreground classes; pred_logits must have this last dimension
            (1 for class-agnostic encoder outputs).
        boxes_weight_format: None, 'iou' or 'giou'. None: VFL target score = IoU, GIoU term
            unweighted. 'iou'/'giou': that quality of each matched pair is both the VFL target
            score and a per-pair weight on the GIoU term (as in RT-DETRv2).
        share_matched_indices: reuse the final layer's matching for the aux decoder layers
            instead of matching each layer.

    forward(outputs, targets, **kwargs) -> dict of weighted scalar losses, keys
        'loss_vfl', 'loss_bbox', 'loss_giou' (final layer), the same with '_aux_{i}' for
        outputs['aux_outputs'][i], '_enc_{i}' for outputs['enc_aux_outputs'][i] and
        '_dn_{i}' for outputs['dn_aux_outputs'][i]. The total loss is the sum of the values.
        Every term is divided by num_boxes = mean over ranks of the batch's target count,
        clamped to >= 1 (times dn_num_group for the denoising terms). kwargs are ignored.
    """

    __inject__ = ["matcher"]
    __share__ = ["num_classes"]

    def __init__(self, matcher, weight_dict: Dict[str, float], losses: List[str], alpha: float = 0.2,
                 gamma: float = 2.0, num_classes: int = 80, boxes_weight_format: Optional[str] = None,
                 share_matched_indices: bool = False):
        super().__init__()
        unknown_losses = [name for name in losses if name not in LOSS_TERMS]
        if unknown_losses:
            raise KeyError(f"RTDETRCriterionv2 losses: unknown {unknown_losses}; valid: {sorted(LOSS_TERMS)}")
        produced = {key for name in losses for key in LOSS_TERMS[name]}
        missing, unused = sorted(produced - set(weight_dict)), sorted(set(weight_dict) - produced)
        if missing or unused:
            raise KeyError(f"RTDETRCriterionv2 weight_dict: missing weights {missing}, weights for terms "
                           f"not computed {unused}; losses={list(losses)} produce {sorted(produced)}")
        if boxes_weight_format not in BOXES_WEIGHT_FORMATS:
            raise ValueError(f"RTDETRCriterionv2 boxes_weight_format={boxes_weight_format!r}; "
                             f"valid: {BOXES_WEIGHT_FORMATS}")
        self.matcher = matcher
        self.weight_dict = {k: float(v) for k, v in weight_dict.items()}
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices

    # ------------------------------------------------------------------ helpers
    def _hungarian_many(self, calls: Sequence[tuple], num_targets: Sequence[int], device) -> List[Match]:
        """Hungarian matches of several layers, calls: (layer_outputs, targets, num_classes, where) each. A matcher
        with ``match_many`` (HungarianMatcher) transfers all costs to the host at once (one device sync)."""
        preds = []
        for layer_outputs, targets, num_classes, where in calls:
            check_num_classes(layer_outputs["pred_logits"], num_classes, where)
            preds.append(({"pred_logits": layer_outputs["pred_logits"], "pred_boxes": layer_outputs["pred_boxes"]},
                          targets))
        if batches_its_forward(self.matcher):
            results = self.matcher.match_many(preds, names=[f"outputs{c[3]}" for c in calls])
        else:
            results = [self.matcher(pred, targets) for pred, targets in preds]
        return matches_from_indices([r["indices"] for r in results], num_targets, device)

    def _normaliser(self, num_targets: int, device) -> Tensor:
        """Mean number of target boxes per rank, clamped to >= 1; 0-dim float tensor."""
        count = torch.full((), float(num_targets), device=device)  # a fill, not a blocking host copy
        return (all_reduce_sum(count) / get_world_size()).clamp(min=1.0)

    def _layer_losses(self, layer_outputs: Dict[str, Tensor], match: Match, tgt_labels: Tensor,
                      tgt_boxes: Tensor, num_boxes: Tensor, num_classes: int, where: str) -> Dict[str, Tensor]:
        """Weighted loss terms of one set of predictions (un-suffixed keys)."""
        logits, boxes = layer_outputs["pred_logits"], layer_outputs["pred_boxes"]
        check_num_classes(logits, num_classes, where)
        src_boxes = boxes[match.batch_idx, match.query_idx].float()
        matched_tgt = tgt_boxes[match.target_idx].to(src_boxes.dtype)
        quality = None
        if self.boxes_weight_format is not None:
            quality = matched_box_quality(src_boxes, matched_tgt, self.boxes_weight_format)

        terms = {}
        if "vfl" in self.losses:
            scores = quality if quality is not None else matched_box_quality(src_boxes, matched_tgt, "iou")
            terms["loss_vfl"] = varifocal_loss(logits, match, tgt_labels[match.target_idx], scores,
                                               self.alpha, self.gamma)
        if "boxes" in self.losses:
            terms.update(box_regression_losses(src_boxes, matched_tgt, quality))
        return {k: v * self.weight_dict[k] / num_boxes for k, v in terms.items()}

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]], **kwargs) -> Dict[str, Tensor]:
        device = outputs["pred_logits"].device
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"RTDETRCriterionv2: {len(targets)} target dicts for a batch of "
                             f"{outputs['pred_logits'].shape[0]} images; pass one dict per image")
        for b, t in enumerate(targets):
            if t["boxes"].ndim != 2 or t["boxes"].shape[-1] != 4 or len(t["labels"]) != len(t["boxes"]):
                raise ValueError(f"RTDETRCriterionv2: targets[{b}] (image_id {t.get('image_id')}) has boxes "
                                 f"{tuple(t['boxes'].shape)} and labels {tuple(t['labels'].shape)}; "
                                 f"expected boxes [n, 4] normalised cxcywh and labels [n]")
        num_targets = [len(t["labels"]) for t in targets]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device).long()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        num_boxes = self._normaliser(sum(num_targets), device)

        def add(terms: Dict[str, Tensor], suffix: str):
            losses.update({k + suffix: v for k, v in terms.items()})

        losses: Dict[str, Tensor] = {}
        aux_outputs = outputs.get("aux_outputs") or []
        enc_aux = outputs.get("enc_aux_outputs") or []
        dn_aux = outputs.get("dn_aux_outputs") or []
        if enc_aux and "enc_meta" not in outputs:
            raise KeyError("RTDETRCriterionv2: outputs has 'enc_aux_outputs' but no 'enc_meta'; the decoder "
                           "must return enc_meta={'class_agnostic': bool}")
        if dn_aux and outputs.get("dn_meta") is None:
            raise KeyError("RTDETRCriterionv2: outputs has 'dn_aux_outputs' but no 'dn_meta'; the decoder "
                           "must return dn_meta with dn_positive_idx and dn_num_group")
        class_agnostic = bool(enc_aux) and bool(outputs["enc_meta"]["class_agnostic"])
        enc_targets, enc_labels, enc_classes = targets, tgt_labels, self.num_classes
        if class_agnostic:
            enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_labels, enc_classes = torch.zeros_like(tgt_labels), 1

        # every Hungarian matching of the step at once: one host transfer of the costs, one copy of the indices
        calls = [(outputs, targets, self.num_classes, "")]
        if not self.share_matched_indices:
            calls += [(aux, targets, self.num_classes, f"['aux_outputs'][{i}]") for i, aux in enumerate(aux_outputs)]
        calls += [(enc, enc_targets, enc_classes, f"['enc_aux_outputs'][{i}]") for i, enc in enumerate(enc_aux)]
        matches = self._hungarian_many(calls, num_targets, device)
        match = matches[0]
        aux_matches = matches[1:1 + len(aux_outputs)] if not self.share_matched_indices else [match] * len(aux_outputs)
        enc_matches = matches[len(matches) - len(enc_aux):]

        add(self._layer_losses(outputs, match, tgt_labels, tgt_boxes, num_boxes, self.num_classes, ""), "")
        for i, (aux, aux_match) in enumerate(zip(aux_outputs, aux_matches)):
            add(self._layer_losses(aux, aux_match, tgt_labels, tgt_boxes, num_boxes, self.num_classes,
                                   f"['aux_outputs'][{i}]"), f"_aux_{i}")

        if dn_aux:
            dn_meta = outputs["dn_meta"]
            dn_match = match_from_denoising(dn_meta, num_targets, device)
            dn_num_boxes = num_boxes * dn_meta["dn_num_group"]
            for i, dn in enumerate(dn_aux):
                add(self._layer_losses(dn, dn_match, tgt_labels, tgt_boxes, dn_num_boxes, self.num_classes,
                                       f"['dn_aux_outputs'][{i}]"), f"_dn_{i}")

        for i, (enc, enc_match) in enumerate(zip(enc_aux, enc_matches)):
            where = f"['enc_aux_outputs'][{i}]"
            add(self._layer_losses(enc, enc_match, enc_labels, tgt_boxes, num_boxes, enc_classes, where), f"_enc_{i}")
        return losses
