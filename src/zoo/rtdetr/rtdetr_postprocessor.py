"""Decoder outputs -> per-image detections (labels, xyxy boxes in original-image pixels, scores)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.core.registry import register
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy

__all__ = ["RTDETRPostProcessor", "MSCOCO_CATEGORY_IDS"]

# COCO category id of each of the 80 contiguous training labels (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused)
MSCOCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


@register()
class RTDETRPostProcessor(nn.Module):
    """Top-``num_top_queries`` detections per image.

    With ``use_focal_loss`` the scores are sigmoid(logits) and the top-k runs jointly over
    queries x classes (a query may give several detections with different labels); otherwise
    softmax without the last (no-object) column, best class per query, then top-k over queries.
    ``remap_mscoco_category`` maps contiguous labels 0..79 to COCO category ids.
    """

    __share__ = ["num_classes"]

    def __init__(self, num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                 remap_mscoco_category: bool = False):
        super().__init__()
        if remap_mscoco_category and num_classes != len(MSCOCO_CATEGORY_IDS):
            raise ValueError(f"RTDETRPostProcessor: remap_mscoco_category needs num_classes=80, got {num_classes}")
        self.num_classes = int(num_classes)
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.register_buffer("category_ids", torch.tensor(MSCOCO_CATEGORY_IDS, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss}, "
                f"num_top_queries={self.num_top_queries}")

    def forward(self, outputs: Dict[str, Tensor], orig_target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: 'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4] normalised cxcywh.
            orig_target_sizes: [B, 2] as (w, h), the size the boxes are scaled to.

        Returns:
            B dicts: 'labels' int64 [K], 'boxes' [K, 4] xyxy in (w, h) pixels, 'scores' [K], sorted by
            score; K = num_top_queries (focal) or min(Q, num_top_queries) (softmax).
        """
        labels, boxes, scores = self.forward_batched(outputs, orig_target_sizes)
        return [{"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores)]

    def forward_batched(self, outputs: Dict[str, Tensor], orig_target_sizes: Tensor):
        """The same detections as batched tensors (the ONNX deployment outputs):
        labels int64 [B, K], boxes [B, K, 4] xyxy pixels, scores [B, K]."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        scale = orig_target_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # [B, 1, 4] (w, h, w, h)
        boxes = box_cxcywh_to_xyxy(boxes) * scale

        if self.use_focal_loss:
            num_classes = logits.shape[-1]
            topk = min(self.num_top_queries, logits.shape[1] * num_classes)
            scores, index = torch.topk(torch.sigmoid(logits).flatten(1), topk, dim=-1)
            labels = index % num_classes
            query = index // num_classes
        else:
            scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(-1)
            topk = min(self.num_top_queries, scores.shape[1])
            scores, query = torch.topk(scores, topk, dim=-1)
            labels = labels.gather(1, query)
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))

        if self.remap_mscoco_category:
            labels = self.category_ids.to(labels.device)[labels]
        return labels, boxes, scores
