"""CASS losses: the per-patch loss l(z, y) (one definition per loss type) and the five normalisations.

Maths: docs/cass_maths.md. Shapes: logits z [B, P] (sigmoid applied only here),
per-box masks [N, P] from `cass_targets.soft_target_masks`, merged target Y [B, P]. No Python loop over
boxes or images, no `.item()`.

Every loss type is written once, as coefficient maps of a polynomial in the target y (`loss_polynomial`):

    l(z, y) = e(z)                                 if y = 0
            = c0(z) + c1(z) y + c2(z) y^2           if y > 0

`per_patch_loss` evaluates it elementwise; `per_object_loss_sums` uses the same coefficients to sum the
loss of each box's own mask over the patches without building an [N, P] loss tensor.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from src.zoo.rtdetr.cass_targets import (_EPS, CASSConfig, box_area_fraction, largest_covering_area,
                                         merge_target_masks, patch_grid, per_box_dot, prepare_batch)


@dataclass(frozen=True)
class LossPolynomial:
    """Coefficient maps (each the logits' shape) of l(z, y) = [y = 0] e + [y > 0] (c0 + c1 y + c2 y^2).

    c0 None: the y > 0 branch starts at e (the loss is continuous at y = 0); c2 None: no quadratic term.
    """
    e: Tensor
    c1: Tensor
    c0: Optional[Tensor] = None
    c2: Optional[Tensor] = None


def loss_polynomial(logits: Tensor, cfg: CASSConfig) -> LossPolynomial:
    """The one definition of each per-patch loss (q = sigmoid(z), a = focal_alpha, b = focal_beta):

    focal: -(1-q)^a log(q) y - q^b log(1-q) (1-y):   e = c0 = -q^b log(1-q),  c1 = -(1-q)^a log q - e
    mse:   (q - y)^2:                                 e = c0 = q^2,  c1 = -2 q,  c2 = 1
    vfl:   y > 0: -y (y log q + (1-y) log(1-q));      c0 = 0,  c1 = -log(1-q),  c2 = log(1-q) - log q
           y = 0: -a q^b log(1-q) = e                 (a jump at y = 0)
    log q and log(1-q) come from logsigmoid(+-z), so there is no log(0). logits [...] -> maps [...].
    """
    q = torch.sigmoid(logits)
    if cfg.loss_type == 'mse':
        return LossPolynomial(e=q * q, c1=-2.0 * q, c2=torch.ones_like(q))
    log_q, log_1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
    if cfg.loss_type == 'focal':
        e = -(q ** cfg.focal_beta) * log_1mq
        return LossPolynomial(e=e, c1=-(torch.sigmoid(-logits) ** cfg.focal_alpha) * log_q - e)
    e = -cfg.focal_alpha * q ** cfg.focal_beta * log_1mq
    return LossPolynomial(e=e, c1=-log_1mq, c2=log_1mq - log_q, c0=torch.zeros_like(e))


def per_patch_loss(logits: Tensor, target: Tensor, cfg: CASSConfig) -> Tensor:
    """Elementwise l(z, y) of cfg.loss_type (`loss_polynomial`); logits and target broadcast."""
    poly = loss_polynomial(logits, cfg)
    positive = poly.c1 * target + (poly.e if poly.c0 is None else poly.c0)
    if poly.c2 is not None:
        positive = positive + poly.c2 * target * target
    if poly.c0 is None:
        return positive
    return torch.where(target > 0, positive, poly.e)


def per_object_loss_sums(logits: Tensor, masks: Tensor, batch_idx: Tensor, cfg: CASSConfig) -> Tensor:
    """S_i = sum_p l(z[b_i, p], M_i[p]) for every box without building l on [N, P].

    logits [B, P], masks [N, P], batch_idx [N] -> [N]:
    S_i = sum_p e_b + M_i . c1_b + M_i^2 . c2_b + [M_i > 0] . (c0 - e)_b, the maps of `loss_polynomial`.
    """
    poly = loss_polynomial(logits, cfg)
    sums = poly.e.sum(1)[batch_idx] + per_box_dot(masks, batch_idx, poly.c1)
    if poly.c2 is not None:
        sums = sums + per_box_dot(masks * masks, batch_idx, poly.c2)
    if poly.c0 is not None:
        sums = sums + per_box_dot((masks > 0).to(masks.dtype), batch_idx, poly.c0 - poly.e)
    return sums


# ---------------------------------------------------------------------------------------- normalisations
def _zero_loss(logits: Tensor) -> Tensor:
    """A zero that keeps the graph (no boxes in the batch): gradient 0, never None or NaN."""
    return logits.sum() * 0.0


def _background_term(z: Tensor, target: Tensor, cfg: CASSConfig) -> Tensor:
    """cfg.bg_weight * mean over (b, p) with Y = 0 of l(z, 0); 0 when there is no such patch."""
    if cfg.bg_weight == 0:
        return z.new_zeros(())
    background = (target == 0).to(z.dtype)
    loss = (per_patch_loss(z, torch.zeros_like(z), cfg) * background).sum()
    return cfg.bg_weight * loss / background.sum().clamp(min=1)


def cass_loss_patch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'patch': mean over all b, p of l(z, Y). logits [B, P] -> scalar; 0 (with graph) if N = 0."""
    z, _, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    return per_patch_loss(z, target, cfg).mean()


def cass_loss_object(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object': (1/N) sum_i mean_p l(z[b_i], M_i). Other boxes' patches are negatives of box i."""
    z, _, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    return per_object_loss_sums(z, masks, batch_idx, cfg).sum() / masks.numel()


def cass_loss_object_area(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object_area': sum_i w_i L_i / sum_i w_i, L_i as in 'object', w_i = clipped box area / (H W).

    A weighted mean (not the seeds' literal sum_i w_i L_i / N, which shrinks by the mean area fraction);
    0 if every box has zero area.
    """
    z, boxes, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    per_object = per_object_loss_sums(z, masks, batch_idx, cfg) / masks.shape[1]
    weights = box_area_fraction(boxes, img_shape)
    return (weights * per_object).sum() / weights.sum().clamp(min=_EPS)



def cass_loss_area_patch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'area_patch': sum_{a>0} a_p l(z, Y) / sum a_p + bg_weight * mean_{Y=0} l(z, 0), over all (b, p)."""
    z, boxes, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    area_weight = largest_covering_area(masks, boxes, batch_idx, img_shape, z.shape[0])
    foreground = (area_weight * per_patch_loss(z, target, cfg)).sum() / area_weight.sum().clamp(min=_EPS)
    return foreground + _background_term(z, target, cfg)


def per_object_mean_loss(z, masks, batch_idx, target, cfg):
    """sum_p M_i[p] l(z, Y)[b_i, p] / sum_p M_i[p] -> ([N], mask mass [N]); 0 for an empty mask."""
    mass = masks.sum(1)
    weighted = per_box_dot(masks, batch_idx, per_patch_loss(z, target, cfg))
    return weighted / mass.clamp(min=_EPS), mass


def cass_loss_object_balanced(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object_balanced': (1/N) sum_i [sum_p M_i l(z, Y) / sum_p M_i] + bg_weight * mean_{Y=0} l(z, 0).

    Each object weighs 1/N whatever its size; a box whose mask is empty (e.g. outside the image) adds 0
    but still counts in N.
    """
    z, _, batch_idx, masks = prepare_batch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    per_object, _ = per_object_mean_loss(z, masks, batch_idx, target, cfg)
    return per_object.mean() + _background_term(z, target, cfg)


_MODES = {
    'patch': cass_loss_patch,
    'object': cass_loss_object,
    'object_area': cass_loss_object_area,
    'area_patch': cass_loss_area_patch,
    'object_balanced': cass_loss_object_balanced,
}


def spatial_smoothness(logits: Tensor, grid) -> Tensor:
    """mean |q[i+1, j] - q[i, j]| + mean |q[i, j+1] - q[i, j]| over the (P_h, P_w) grid; [B, P] -> scalar.

    A term is 0 when its axis has a single patch.
    """
    ph, pw = grid
    q = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))).reshape(-1, ph, pw)
    total = q.sum() * 0.0
    if ph > 1:
        total = total + (q[:, 1:, :] - q[:, :-1, :]).abs().mean()
    if pw > 1:
        total = total + (q[:, :, 1:] - q[:, :, :-1]).abs().mean()
    return total


def cass_loss(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None) -> Tensor:
    """CASS loss of cfg.normalization plus cfg.spatial_reg * spatial_smoothness.

    logits [B, P] (P = P_h * P_w, row-major), gt_bboxes: list of B tensors [N_b, 4] (x1, y1, x2, y2 pixels
    of the H x W input), feat_shape (h, w), img_shape (H, W). Returns a float scalar (float32 or the
    logits' wider dtype). A batch without boxes gives 0 from the normalisation term (with a graph); the
    smoothness term does not depend on boxes and is added whenever spatial_reg > 0.
    """
    loss = _MODES[cfg.normalization](logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks=masks)
    if cfg.spatial_reg > 0:
        loss = loss + cfg.spatial_reg * spatial_smoothness(logits, patch_grid(feat_shape, patch_size))
    return loss


def cass_loss_levels(logits_per_level, gt_bboxes, feat_shapes, img_shape, patch_size, cfg) -> Tensor:
    """Several pruned levels: the equal-weight mean of `cass_loss` over levels.

    logits_per_level: list of L tensors [B, P_l]; feat_shapes: list of L (h_l, w_l); cfg: one CASSConfig
    for every level, or a list of L (one normalisation per level, `dset.cass_normalization: [a, b]`). Each
    level builds its own masks from the same pixel boxes. The mean (not the sum) keeps the loss scale
    independent of how many levels are pruned. (A loop over the 1-3 levels, not over boxes.)
    """
    if len(logits_per_level) != len(feat_shapes) or not feat_shapes:
        raise ValueError(f"cass_loss_levels: {len(logits_per_level)} logit tensors for {len(feat_shapes)} "
                         f"feature shapes; pass one (h, w) per pruned level")
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * len(feat_shapes)
    if len(cfgs) != len(feat_shapes):
        raise ValueError(f"cass_loss_levels: {len(cfgs)} CASS configs for {len(feat_shapes)} pruned levels; "
                         f"pass one config, or one per level")
    losses = [cass_loss(z, gt_bboxes, shape, img_shape, patch_size, c)
              for z, shape, c in zip(logits_per_level, feat_shapes, cfgs)]
    return torch.stack(losses).mean()


def cass_score_gradient_norm(logits_per_level, gt_bboxes, feat_shapes, img_shape, patch_size, cfg) -> Tensor:
    """|| d cass_loss_levels / d z ||_2: the size of the gradient CASS sends to the pruner's scores.

    The logits are detached first, so this is the loss's own gradient on the scores z (every level's
    [B, P_l] logits together), whatever produced them. Arguments as `cass_loss_levels`; returns a 0-d
    tensor. Used to compare the strength of the normalisations at the same `cass_loss_weight`
    (tools/bias_experiment.py, docs/cass_bias.md).
    """
    with torch.enable_grad():
        zs = [z.detach().requires_grad_(True) for z in logits_per_level]
        loss = cass_loss_levels(zs, gt_bboxes, feat_shapes, img_shape, patch_size, cfg)
        grads = torch.autograd.grad(loss, zs, allow_unused=True)
    return torch.sqrt(sum((g * g).sum() for g in grads if g is not None) + zs[0].new_zeros(()))
