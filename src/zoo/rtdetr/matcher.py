"""Hungarian matching between the decoder's queries and the ground-truth boxes of each image.

The cost of assigning query q to target j is a weighted sum of a classification cost (focal-style
by default), the L1 distance between the normalised cxcywh boxes and the negative GIoU. The cost
matrix is built for the whole batch with one set of tensor ops; only scipy's
``linear_sum_assignment`` runs per image, on CPU. ``match_many`` matches several sets of predictions of
one step (final layer, aux layers, encoder proposals) with ONE device-to-host transfer of their costs.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from src.core.registry import register
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

MATCHER_COST_KEYS = ("cost_class", "cost_bbox", "cost_giou")


def focal_class_cost(prob: Tensor, alpha: float, gamma: float, eps: float = 1e-8) -> Tensor:
    """Focal-loss classification cost of calling each prediction positive for a class.

    prob: [N, M] sigmoid probability of prediction n for the class of target m.
    Returns [N, M]: focal loss if the class were positive minus focal loss if it were negative,
    so that a confident correct prediction has a low (negative) cost.
    """
    pos = alpha * (1 - prob).pow(gamma) * -(prob + eps).log()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + eps).log()
    return pos - neg


@register()
class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted matching cost.

    Args:
        weight_dict: weights of the three costs, exactly the keys ``cost_class``, ``cost_bbox``,
            ``cost_giou`` (RT-DETRv2: 2, 5, 2).
        use_focal_loss: True: focal class cost on sigmoid probabilities (RT-DETRv2);
            False: ``-softmax probability`` of the target class (original DETR).
        alpha, gamma: focal cost parameters (only used when ``use_focal_loss``).

    forward(outputs, targets) -> ``{'indices': [(src_idx, tgt_idx), ...]}``, one pair per image:
        src_idx int64 [k_b] query indices (sorted ascending) and tgt_idx int64 [k_b] indices into
        that image's targets, with k_b = min(num_queries, num_targets_b); both on CPU. An image
        without targets gives two empty tensors. A dict (not a bare list) so that extra matching
        outputs can be added without changing the caller.
    """

    def __init__(self, weight_dict: Dict[str, float], use_focal_loss: bool = True,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        unknown = sorted(set(weight_dict) - set(MATCHER_COST_KEYS))
        missing = sorted(set(MATCHER_COST_KEYS) - set(weight_dict))
        if unknown or missing:
            raise KeyError(f"HungarianMatcher weight_dict: unknown keys {unknown}, missing keys "
                           f"{missing}; expected exactly {list(MATCHER_COST_KEYS)}")
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor,
                    tgt_boxes: Tensor) -> Tensor:
        """Matching cost of every query of every image against every target of the batch.

        pred_logits [B, Q, C], pred_boxes [B, Q, 4] normalised cxcywh, tgt_labels int64 [T] and
        tgt_boxes [T, 4] (all images' targets concatenated). Returns float32 [B, Q, T].
        """
        bs, num_queries = pred_logits.shape[:2]
        logits = pred_logits.flatten(0, 1).float()                     # [B*Q, C]
        boxes = pred_boxes.flatten(0, 1).float()                       # [B*Q, 4]
        tgt_boxes = tgt_boxes.to(boxes)
        if self.use_focal_loss:
            prob = logits.sigmoid()[:, tgt_labels]                     # [B*Q, T]
            cost_class = focal_class_cost(prob, self.alpha, self.gamma)
        else:
            cost_class = -logits.softmax(-1)[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, -1)

    def forward(self, outputs: Dict[str, Tensor],
                targets: List[Dict[str, Tensor]]) -> Dict[str, List[Tuple[Tensor, Tensor]]]:
        return self.match_many([(outputs, targets)])[0]

    @torch.no_grad()
    def match_many(self, calls: Sequence[Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]],
                   names: Sequence[str] = ()) -> List[Dict[str, List[Tuple[Tensor, Tensor]]]]:
        """``forward`` of each (outputs, targets) pair, with one host transfer for all of them.

        The cost matrices are built on the predictions' device, concatenated and copied to the host once
        (one device sync per training step instead of one per matched layer); the assignment runs there.
        ``names`` (optional, one per call) locate a non-finite cost in the error message.
        """
        costs, sizes = [], []
        for outputs, targets in calls:
            pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
            if len(targets) != pred_logits.shape[0]:
                raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of "
                                 f"{pred_logits.shape[0]} predictions; pass one dict per image")
            sizes.append([len(t["boxes"]) for t in targets])
            if sum(sizes[-1]) == 0:
                costs.append(None)
                continue
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(pred_logits.device)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(pred_boxes.device)
            costs.append(self.cost_matrix(pred_logits, pred_boxes, tgt_labels, tgt_boxes))  # [B, Q, T]
        present = [c for c in costs if c is not None]
        host = torch.cat([c.reshape(-1) for c in present]).cpu().numpy() if present else np.zeros(0)  # the one sync
        results, offset = [], 0
        empty = torch.zeros(0, dtype=torch.int64)
        for n, (cost, image_sizes) in enumerate(zip(costs, sizes)):
            if cost is None:
                results.append({"indices": [(empty, empty) for _ in image_sizes]})
                continue
            block = host[offset: offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            if not np.isfinite(block).all():
                where = f" ({names[n]})" if n < len(names) else ""
                raise FloatingPointError(f"HungarianMatcher: the matching cost{where} contains NaN/inf, so the "
                                         "predictions (pred_logits / pred_boxes) are not finite; the model has "
                                         "diverged (lower the learning rate or check the inputs)")
            indices, start = [], 0
            for b, size in enumerate(image_sizes):
                if size == 0:
                    indices.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(block[b, :, start: start + size])
                start += size
                indices.append((torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))))
            results.append({"indices": indices})
        return results
