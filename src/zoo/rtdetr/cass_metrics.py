"""CASS diagnostics and keep-bias metrics (no gradient): where the loss sits, and which boxes the pruner keeps.

Maths: docs/cass_maths.md ("Diagnostics"). `keep_bias_stats` returns sums and counts per call (one
pruned level of one batch) to accumulate over an eval set; `finalize_keep_bias` turns them into ratios.
"""
import math
import re

import torch
from torch import Tensor

from src.zoo.rtdetr.cass_losses import per_object_mean_loss, per_patch_loss
from src.zoo.rtdetr.cass_targets import (_EPS, REGIONS, SIZE_BUCKETS, box_area_fraction, core_masks,
                                         merge_target_masks, patch_centres_pixels, per_box_dot, prepare_batch,
                                         size_bucket)

LEVEL_SEP = '/'   # '<level>/<key>' in the sums of `keep_bias_stats(..., level=...)`


def _bucket_sums(values: Tensor, bucket: Tensor, valid: Tensor, num_buckets: int):
    """Per-bucket sums and counts of values[valid]: ([K], [K])."""
    weight = valid.to(values.dtype)
    sums = values.new_zeros(num_buckets).index_add_(0, bucket, values * weight)
    counts = values.new_zeros(num_buckets).index_add_(0, bucket, weight)
    return sums, counts


@torch.no_grad()
def cass_spatial_stats(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg) -> dict:
    """Diagnostics of where the loss sits (no gradient). Every value is a 0-d tensor.

    'top_left_loss': mean l(z, Y) over patches (all images) whose centre is in the top-left image quadrant
    (x < W/2 and y < H/2, centres in input pixels); 'bottom_loss': over the bottom half (y >= H/2);
    '{small,medium,large}_obj_loss': mean over boxes of the COCO bucket of sum_p M_i l(z, Y) / sum_p M_i
    (boxes with an empty mask are skipped). Each key has a '<key>_count' (patches or boxes); a mean over
    nothing is 0 with count 0.
    """
    z, boxes, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, None)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    loss = per_patch_loss(z, target, cfg)
    cy, cx = patch_centres_pixels(feat_shape, img_shape, patch_size, z.device, z.dtype)
    H, W = img_shape
    regions = {'top_left_loss': (cx < W / 2) & (cy < H / 2), 'bottom_loss': cy >= H / 2}
    stats = {}
    for key, region in regions.items():
        count = region.to(z.dtype).sum() * z.shape[0]
        stats[key] = (loss * region).sum() / count.clamp(min=1)
        stats[key + '_count'] = count
    per_object, mass = per_object_mean_loss(z, masks, batch_idx, target, cfg)
    bucket = size_bucket(box_area_fraction(boxes, img_shape) * (H * W))
    sums, counts = _bucket_sums(per_object, bucket, mass > 0, len(SIZE_BUCKETS))
    for k, name in enumerate(SIZE_BUCKETS):
        stats[f'{name}_obj_loss'] = sums[k] / counts[k].clamp(min=1)
        stats[f'{name}_obj_loss_count'] = counts[k]
    return stats


def keep_count(num_patches: int, keep_ratio: float, min_patches: int = 1) -> int:
    """K = min(P, max(min_patches, ceil(keep_ratio * P))): the pruner's rule.

    The product is rounded to 9 decimals first, so float noise (0.07 * 100 = 7.000000000000001) does not
    add a patch.
    """
    return min(num_patches, max(int(min_patches), math.ceil(round(keep_ratio * num_patches, 9))))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """bool [B, P], True on each row's k highest scores; ties go to the lower patch index (stable sort)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


@torch.no_grad()
def keep_bias_stats(logits, gt_bboxes, feat_shape, img_shape, patch_size, keep_ratio, cfg, min_patches=1,
                    level=None) -> dict:
    """Sums and counts (0-d tensors) to accumulate over an eval set, then pass to `finalize_keep_bias`.

    Keys, for g in small, medium, large (COCO area of the clipped box) and far, near (box centre y < H/2 or
    not), over boxes with at least one core patch:
      'keep_recall_{g}_sum'         sum of (kept core patches / core patches) for the logits' top-K
      'oracle_keep_recall_{g}_sum'  the same for the top-K of the target Y (ties -> lower patch index)
      'boxes_{g}_count'             number of such boxes
      'boxes_without_core_count'    boxes skipped because no patch centre lies in them
    and, over images with at least one box (sum Y > 0):
      'centroid_q_x_sum', 'centroid_q_y_sum'            sum of the q-weighted patch-centre centroid
      'centroid_target_x_sum', 'centroid_target_y_sum'  sum of the Y-weighted centroid
      'centroid_images_count'                           number of such images
      'target_bottom_share_sum'   sum of (target mass on bottom-half patches / target mass)
      'kept_bottom_share_sum'     sum of (kept top-K patches in the bottom half / K)
      'target_positive_share_sum' sum of (patches with Y > 0 / P)
    and once per call 'keep_fraction_sum' (K / P times the number of such images). A patch is in the bottom
    half when its centre y >= H / 2. Centroids are in normalised image coordinates (x / W, y / H of patch
    centres).
    K = keep_count(P, keep_ratio, min_patches).
    level: None, or a level name (e.g. `level_name(feat_shape, img_shape)` = 'P4'): every key is then also
    returned as '<level>/<key>', so that summing the stats of several levels pools the plain keys and keeps
    each level's own copy; `finalize_keep_bias` then adds the per-level figures '<figure>_<level>'.
    """
    z, boxes, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, None)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    k = keep_count(z.shape[1], keep_ratio, min_patches)
    core = core_masks(boxes, feat_shape, img_shape, patch_size, cfg).to(z.dtype)
    core_count = core.sum(1)
    has_core = core_count > 0
    H, W = img_shape
    bucket = size_bucket(box_area_fraction(boxes, img_shape) * (H * W))
    region = ((boxes[:, 1] + boxes[:, 3]) / 2 >= H / 2).long()   # 0 far (top half), 1 near
    stats = {}
    for prefix, scores in (('keep_recall', z), ('oracle_keep_recall', target)):
        kept = top_k_mask(scores, k).to(z.dtype)
        recall = per_box_dot(core, batch_idx, kept) / core_count.clamp(min=1)
        for names, group in ((SIZE_BUCKETS, bucket), (REGIONS, region)):
            sums, counts = _bucket_sums(recall, group, has_core, len(names))
            for g, name in enumerate(names):
                stats[f'{prefix}_{name}_sum'] = sums[g]
                stats[f'boxes_{name}_count'] = counts[g]
    stats['boxes_without_core_count'] = (~has_core).sum().to(z.dtype)
    cy, cx = patch_centres_pixels(feat_shape, img_shape, patch_size, z.device, z.dtype)
    cy, cx = cy / H, cx / W
    has_box = (target.sum(1) > 0).to(z.dtype)
    for name, weights in (('q', torch.sigmoid(z)), ('target', target)):
        mass = weights.sum(1).clamp(min=_EPS)
        stats[f'centroid_{name}_x_sum'] = ((weights @ cx) / mass * has_box).sum()
        stats[f'centroid_{name}_y_sum'] = ((weights @ cy) / mass * has_box).sum()
    stats['centroid_images_count'] = has_box.sum()
    bottom = (cy >= 0.5).to(z.dtype)
    kept = top_k_mask(z, k).to(z.dtype)
    stats['target_bottom_share_sum'] = ((target @ bottom) / target.sum(1).clamp(min=_EPS) * has_box).sum()
    stats['kept_bottom_share_sum'] = ((kept @ bottom) / k * has_box).sum()
    stats['target_positive_share_sum'] = ((target > 0).to(z.dtype).mean(1) * has_box).sum()
    stats['keep_fraction_sum'] = has_box.sum() * (k / z.shape[1])
    if level is not None:
        stats.update({f'{level}{LEVEL_SEP}{key}': value for key, value in list(stats.items())})
    return stats


def level_name(feat_shape, img_shape) -> str:
    """Name of a feature level from its stride: 'P<n>' with stride 2^n (W / w rounded to a power of two).

    (h, w) = (18, 32) of a 288 x 512 input -> 'P4'; (9, 16) -> 'P5'.
    """
    stride = max(img_shape[0] / feat_shape[0], img_shape[1] / feat_shape[1])
    return f'P{round(math.log2(stride))}'


def bias_tag(key: str) -> str:
    """TensorBoard tag (below 'eval_bias/') of a `finalize_keep_bias` key: per-level figures
    'keep_recall_small_P4' -> 'P4/keep_recall_small'; pooled ones are unchanged."""
    head, _, tail = key.rpartition('_')
    if head and re.fullmatch(r'P\d+', tail):
        return f'{tail}/{head}'
    return key


def finalize_keep_bias(sums: dict) -> dict:
    """Accumulated `keep_bias_stats` sums -> floats.

    Returns keep_recall_{small,medium,large,far,near}, oracle_keep_recall_{...}, centroid_dx, centroid_dy
    (centroid of q minus centroid of Y, normalised image coordinates; dy < 0 = the scores sit higher than
    the target), the target diagnostics over images with a box: target_bottom_share (share of the target
    mass in the bottom half), kept_bottom_share (share of the kept patches in the bottom half),
    bottom_keep_ratio = kept_bottom_share / target_bottom_share (< 1: the pruner keeps less of the near,
    bottom half than the target asks for; the headline drift figure), target_positive_share (patches with
    Y > 0) against keep_fraction (K / P, the keep budget), plus the counts num_boxes_{...}, num_boxes_without_core, num_images_centroid. A ratio over
    an empty group is 0.0 (its count says so). Sums made with `keep_bias_stats(..., level=L)` also give
    every one of these per level, as '<key>_<L>' (e.g. keep_recall_near_P5, centroid_dy_P4).
    """
    pooled = {key: v for key, v in sums.items() if LEVEL_SEP not in key}
    out = _finalize_pooled(pooled)
    levels = sorted({key.split(LEVEL_SEP, 1)[0] for key in sums if LEVEL_SEP in key})
    for level in levels:
        own = {key.split(LEVEL_SEP, 1)[1]: v for key, v in sums.items() if key.startswith(level + LEVEL_SEP)}
        out.update({f'{key}_{level}': v for key, v in _finalize_pooled(own).items()})
    return out


def _finalize_pooled(sums: dict) -> dict:
    """`finalize_keep_bias` of one set of sums without level copies."""
    value = {key: float(v) for key, v in sums.items()}
    out = {}
    for name in SIZE_BUCKETS + REGIONS:
        count = value[f'boxes_{name}_count']
        for prefix in ('keep_recall', 'oracle_keep_recall'):
            out[f'{prefix}_{name}'] = value[f'{prefix}_{name}_sum'] / count if count > 0 else 0.0
        out[f'num_boxes_{name}'] = count
    images = value['centroid_images_count']
    for axis in ('x', 'y'):
        diff = value[f'centroid_q_{axis}_sum'] - value[f'centroid_target_{axis}_sum']
        out[f'centroid_d{axis}'] = diff / images if images > 0 else 0.0
    for name in ('target_bottom_share', 'kept_bottom_share', 'target_positive_share', 'keep_fraction'):
        out[name] = value[f'{name}_sum'] / images if images > 0 else 0.0
    out['bottom_keep_ratio'] = (out['kept_bottom_share'] / out['target_bottom_share']
                                if out['target_bottom_share'] > 0 else 0.0)
    out['num_boxes_without_core'] = value['boxes_without_core_count']
    out['num_images_centroid'] = images
    return out
