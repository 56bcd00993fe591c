"""Contrastive denoising queries (DN-DETR / DINO, as in RT-DETR).

Each image's ground truths are padded to G = max boxes per image and repeated in ``num_group``
groups; a group holds G positive queries (the boxes with small noise) followed by G negative
queries (larger noise, to be predicted as background). Labels are flipped at random, boxes are
jittered, and an attention mask keeps the groups (and the ordinary queries) from seeing each other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from src.misc.transfer import tensor_on
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def pad_targets(targets: List[Dict[str, Tensor]], num_classes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Stack per-image labels and boxes into padded batch tensors, without a loop over boxes.

    Args:
        targets: B dicts with 'labels' int64 [n_b] and 'boxes' [n_b, 4] normalised cxcywh.
        num_classes: the padding label.

    Returns:
        labels [B, G] int64 (padding = num_classes), boxes [B, G, 4] (padding = 0),
        valid [B, G] bool, with G = max_b n_b.
    """
    counts = [len(t["labels"]) for t in targets]
    batch, max_count = len(targets), max(counts)
    device = targets[0]["labels"].device
    dtype = targets[0]["boxes"].dtype
    labels = torch.full((batch, max_count), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros((batch, max_count, 4), dtype=dtype, device=device)
    total = sum(counts)
    count_t = tensor_on(counts, device)
    image_idx = torch.repeat_interleave(torch.arange(batch, device=device), count_t, output_size=total)
    starts = torch.cumsum(count_t, 0) - count_t
    slot_idx = torch.arange(total, device=device) - starts[image_idx]
    labels[image_idx, slot_idx] = torch.cat([t["labels"] for t in targets]).to(torch.int64)
    boxes[image_idx, slot_idx] = torch.cat([t["boxes"] for t in targets]).to(dtype)
    valid = torch.arange(max_count, device=device)[None, :] < count_t[:, None]
    return labels, boxes, valid


def positive_query_indices(counts: List[int], num_group: int, group_size: int, device=None) -> List[Tensor]:
    """The positive denoising queries of each image, without reading the device: group g holds image b's
    positives at g * group_size + [0, n_b). counts: n_b per image (host ints). Returns B int64 tensors
    [n_b * num_group], group-major (group 0's positives, then group 1's, ...)."""
    start = torch.arange(num_group, device=device)[:, None] * group_size            # [G, 1]
    return [(start + torch.arange(n, device=device)[None, :]).reshape(-1) for n in counts]


def denoising_attention_mask(num_denoising: int, group_size: int, num_queries: int, device=None) -> Tensor:
    """Self-attention mask, True = blocked: [num_denoising + num_queries] x [num_denoising + num_queries].

    Denoising query i belongs to group i // group_size and sees only its own group; the ordinary
    (matching) queries see each other but no denoising query; denoising queries see the ordinary ones.
    """
    size = num_denoising + num_queries
    mask = torch.zeros((size, size), dtype=torch.bool, device=device)
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    mask[num_denoising:, :num_denoising] = True
    return mask


def get_contrastive_denoising_training_group(targets: List[Dict[str, Tensor]],
                                             num_classes: int,
                                             num_queries: int,
                                             class_embed: nn.Embedding,
                                             num_denoising: int = 100,
                                             label_noise_ratio: float = 0.5,
                                             box_noise_scale: float = 1.0
                                             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                                        Optional[dict]]:
    """Build the denoising queries for a batch.

    Args:
        targets: B dicts with 'labels' int64 [n_b] and 'boxes' [n_b, 4] normalised cxcywh.
        num_classes: C; label C is the padding label (``class_embed`` row C, its padding_idx).
        num_queries: Q, ordinary queries that follow the denoising ones.
        class_embed: nn.Embedding(C + 1, hidden).
        num_denoising: budget of positive queries per image; num_group = max(1, budget // G).
        label_noise_ratio: a real label is replaced by a uniform random class with probability ratio / 2.
        box_noise_scale: corners move by up to scale * half the box side (positives: < 1x, negatives: 1x-2x).

    Returns:
        (content [B, N, hidden], reference boxes in logit space [B, N, 4], attention mask [N + Q, N + Q] bool,
        dn_meta) with N = 2 * G * num_group, or four Nones when num_denoising <= 0 or no image has a box.
        dn_meta: 'dn_positive_idx' list of B int64 tensors (the positive queries of image b, group-major,
        len n_b * num_group), 'dn_num_group' int, 'dn_num_split' [N, Q].
    """
    if num_denoising <= 0 or not targets:
        return None, None, None, None
    counts = [len(t["labels"]) for t in targets]
    max_count = max(counts)
    if max_count == 0:
        return None, None, None, None
    num_group = max(1, num_denoising // max_count)
    group_size = 2 * max_count
    total_dn = group_size * num_group

    labels, boxes, valid = pad_targets(targets, num_classes)  # [B, G], [B, G, 4], [B, G]
    device = labels.device
    # [B, 2G * num_group]: group-major, positives then negatives inside a group
    labels = labels.repeat(1, 2 * num_group)
    boxes = boxes.repeat(1, 2 * num_group, 1)
    valid = valid.repeat(1, 2 * num_group)
    is_negative = ((torch.arange(total_dn, device=device) % group_size) >= max_count)  # [N]

    dn_positive_idx = positive_query_indices(counts, num_group, group_size, device)

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < (label_noise_ratio * 0.5)
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & valid, random_labels, labels)

    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_wh = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + is_negative[None, :, None].to(boxes.dtype)
        corners = (corners + sign * magnitude * half_wh).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(corners)

    content = class_embed(labels)
    reference_unact = inverse_sigmoid(boxes)
    attn_mask = denoising_attention_mask(total_dn, group_size, num_queries, device)
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
               "dn_num_split": [total_dn, num_queries]}
    return content, reference_unact, attn_mask, dn_meta
