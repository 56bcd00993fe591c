"""CASS (Context-Aware Soft Supervision): the maths of /work/shared/CASS_SPEC.md as pure, vectorised functions.

The DSET pruner predicts one importance logit per patch; CASS supervises those logits with a soft mask built
from the ground-truth boxes. Everything here is a pure function of tensors; `PatchLevelPruner` delegates to it.

Conventions (see docs/cass_maths.md for the full derivation):
- boxes: absolute x1, y1, x2, y2 pixels of the padded input tensor of size H x W (`img_shape = (H, W)`);
- feature map h x w (`feat_shape = (h, w)`), strides s_x = W / w, s_y = H / h;
- patch size k cells, grid P_h = ceil(h / k) rows by P_w = ceil(w / k) columns, P = P_h * P_w, patches
  flattened row-major (p = i * P_w + j); patch (i, j) has its centre at ((j + 0.5) k, (i + 0.5) k) feature
  cells, also for a partial last patch (whose centre may then lie beyond the map);
- logits z [B, P]; the sigmoid is applied only inside the losses (q = sigmoid(z));
- the boxes of a batch are packed into one [N, 4] tensor with a batch index [N] (`pack_boxes`), and all
  per-box work is done on [N, P] tensors reduced with scatter / matmul / gather ops: no Python loop over
  boxes or images and no `.item()` in the loss path.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZATIONS = ('patch', 'object', 'object_area', 'area_patch', 'object_balanced')
LOSS_TYPES = ('mse', 'focal', 'vfl')
DECAY_TYPES = ('gaussian', 'linear')
SIZE_BUCKETS = ('small', 'medium', 'large')
REGIONS = ('far', 'near')
SMALL_AREA = 32.0 ** 2   # COCO thresholds, in input pixels
LARGE_AREA = 96.0 ** 2
_EPS = 1e-12


@dataclass(frozen=True)
class CASSConfig:
    """Every setting of the CASS target and loss (config keys `dset.cass_<name>`).

    expansion_ratio: r, the context band dilates a box by r * width left/right and r * height top/bottom.
    min_size: boxes narrower / shorter than this many feature cells are widened to it about their centre.
    decay_type: 'gaussian' exp(-d^2 / (2 * 0.5^2)) or 'linear' max(0, 1 - d) in the band.
    use_subpixel_offset: True keeps boxes in float cells; False snaps them outward to whole cells first.
    loss_type: 'mse' | 'focal' | 'vfl' (per-patch loss, see `per_patch_loss`).
    focal_alpha, focal_beta: exponents of the soft focal loss (also the y = 0 branch of 'vfl').
    normalization: one of NORMALIZATIONS (see `cass_loss`).
    bg_weight: weight of the background term of 'area_patch' and 'object_balanced'.
    spatial_reg: lambda of the smoothness term on q over the patch grid (0 = off).
    """
    expansion_ratio: float = 0.8
    min_size: float = 2.0
    decay_type: str = 'gaussian'
    use_subpixel_offset: bool = True
    loss_type: str = 'focal'
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    normalization: str = 'patch'
    bg_weight: float = 1.0
    spatial_reg: float = 0.0

    def __post_init__(self):
        choices = {'decay_type': DECAY_TYPES, 'loss_type': LOSS_TYPES, 'normalization': NORMALIZATIONS}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"CASSConfig.{name} (config key dset.cass_{name}) = {value!r} is not valid; "
                                 f"choose one of {', '.join(repr(v) for v in valid)}")
        if not isinstance(self.use_subpixel_offset, bool):
            raise ValueError(f"CASSConfig.use_subpixel_offset (dset.cass_use_subpixel_offset) must be true or "
                             f"false, got {self.use_subpixel_offset!r}")
        for f in fields(self):
            if f.name in choices or f.name == 'use_subpixel_offset':
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"CASSConfig.{f.name} (config key dset.cass_{f.name}) = {value!r} is not "
                                 f"valid; it must be a finite number >= 0")


# ----------------------------------------------------------------------------------------------- geometry
def pack_boxes(gt_bboxes: list) -> tuple:
    """Concatenate per-image boxes.

    gt_bboxes: list of B tensors [N_b, 4] (x1, y1, x2, y2 input pixels).
    Returns (boxes [N, 4] float, batch_idx [N] long) with N = sum N_b, boxes in image order.
    """
    counts = [int(b.shape[0]) for b in gt_bboxes]   # shapes only: no device sync
    if not gt_bboxes:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    device = gt_bboxes[0].device
    boxes = torch.cat([b.reshape(-1, 4) for b in gt_bboxes]).to(device)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    batch_idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long),
                                        output_size=sum(counts)).to(device)
    return boxes, batch_idx


def patch_grid(feat_shape, patch_size: int) -> tuple:
    """Patch grid of a feature map: (P_h, P_w) = (ceil(h / k), ceil(w / k))."""
    h, w = int(feat_shape[0]), int(feat_shape[1])
    if int(patch_size) < 1 or h < 1 or w < 1:
        raise ValueError(f"patch_grid: need patch_size >= 1 and a non-empty feature map, got "
                         f"patch_size={patch_size}, feat_shape={tuple(feat_shape)}")
    k = int(patch_size)
    return -(-h // k), -(-w // k)


def patch_centres(feat_shape, patch_size: int, device=None, dtype=torch.float32) -> tuple:
    """Patch centres in feature cells: (cy [P_h], cx [P_w]) = ((i + 0.5) k, (j + 0.5) k).

    A partial last patch keeps the centre (j + 0.5) k, which may lie beyond the map edge.
    """
    ph, pw = patch_grid(feat_shape, patch_size)
    k = float(patch_size)
    cy = (torch.arange(ph, device=device, dtype=dtype) + 0.5) * k
    cx = (torch.arange(pw, device=device, dtype=dtype) + 0.5) * k
    return cy, cx


def boxes_to_cells(boxes: Tensor, feat_shape, img_shape, cfg: CASSConfig) -> Tensor:
    """Steps 1, 5 and 2 of the spec: pixels -> feature cells, optional outward snap, min-size widening.

    boxes [N, 4] pixels -> [N, 4] feature cells (x1, y1, x2, y2).
    """
    h, w = feat_shape
    H, W = img_shape
    stride = boxes.new_tensor([W / w, H / h, W / w, H / h])
    cells = boxes / stride
    if not cfg.use_subpixel_offset:
        cells = torch.cat([cells[:, :2].floor(), cells[:, 2:].ceil()], dim=1)
    lo, hi = cells[:, :2], cells[:, 2:]
    centre, size = (lo + hi) / 2, hi - lo
    short = size < cfg.min_size
    lo = torch.where(short, centre - cfg.min_size / 2, lo)
    hi = torch.where(short, centre + cfg.min_size / 2, hi)
    return torch.cat([lo, hi], dim=1)


def box_area_fraction(boxes: Tensor, img_shape) -> Tensor:
    """Area of each box clipped to the input tensor, / (H W): [N, 4] -> [N] in [0, 1]."""
    H, W = img_shape
    x1, x2 = boxes[:, 0].clamp(0, W), boxes[:, 2].clamp(0, W)
    y1, y2 = boxes[:, 1].clamp(0, H), boxes[:, 3].clamp(0, H)
    return (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0) / (H * W)


def _axis_distances(cells: Tensor, feat_shape, patch_size: int, cfg: CASSConfig):
    """Per-axis distance of every patch centre to every box and per-axis band membership.

    cells [N, 4] -> dx [N, P_w], dy [N, P_h] (0 inside the box's extent on that axis),
    band_x [N, P_w], band_y [N, P_h] (bool, closed), norm [N, 1] = max(sqrt((r w)^2 + (r h)^2), 1e-6).
    """
    cy, cx = patch_centres(feat_shape, patch_size, cells.device, cells.dtype)
    x1, y1, x2, y2 = cells[:, 0:1], cells[:, 1:2], cells[:, 2:3], cells[:, 3:4]
    rx = cfg.expansion_ratio * (x2 - x1)
    ry = cfg.expansion_ratio * (y2 - y1)
    dx = (x1 - cx).clamp(min=0) + (cx - x2).clamp(min=0)
    dy = (y1 - cy).clamp(min=0) + (cy - y2).clamp(min=0)
    band_x = (cx >= x1 - rx) & (cx <= x2 + rx)
    band_y = (cy >= y1 - ry) & (cy <= y2 + ry)
    norm = torch.sqrt(rx * rx + ry * ry).clamp(min=1e-6)
    return dx, dy, band_x, band_y, norm


def soft_target_masks(boxes: Tensor, batch_idx: Tensor, feat_shape, img_shape, patch_size: int,
                      cfg: CASSConfig) -> Tensor:
    """Per-box soft masks M_i (spec steps 1-5).

    boxes [N, 4] input pixels, batch_idx [N] (not needed for the mask itself; checked for length).
    Returns [N, P] in [0, 1]: 1 where the patch centre is inside the (processed) box, decay(d) in the
    context band, 0 elsewhere. The gaussian is separable: exp(-2 (dx^2 + dy^2) / D^2) is the product of a
    column factor and a row factor, each zeroed outside the band on its axis, and both are 1 in the core;
    so the [N, P] mask is one outer product of [N, P_h] and [N, P_w] tensors. The linear decay is not
    separable and is evaluated on the broadcast [N, P_h, P_w] distance.
    """
    if boxes.shape[0] != batch_idx.shape[0]:
        raise ValueError(f"soft_target_masks: {boxes.shape[0]} boxes but {batch_idx.shape[0]} batch indices")
    n = boxes.shape[0]
    cells = boxes_to_cells(boxes, feat_shape, img_shape, cfg)
    dx, dy, band_x, band_y, norm = _axis_distances(cells, feat_shape, patch_size, cfg)
    if cfg.decay_type == 'gaussian':
        fx = torch.exp(-2.0 * (dx / norm) ** 2) * band_x
        fy = torch.exp(-2.0 * (dy / norm) ** 2) * band_y
        masks = fy[:, :, None] * fx[:, None, :]
    else:
        d = torch.sqrt(dx[:, None, :] ** 2 + dy[:, :, None] ** 2) / norm[:, :, None]
        masks = (1.0 - d).clamp(min=0) * (band_y[:, :, None] & band_x[:, None, :])
    return masks.reshape(n, dx.shape[1] * dy.shape[1])


def core_masks(boxes: Tensor, feat_shape, img_shape, patch_size: int, cfg: CASSConfig) -> Tensor:
    """Core indicator: patch centre inside the processed box (closed). [N, 4] -> bool [N, P]."""
    cells = boxes_to_cells(boxes, feat_shape, img_shape, cfg)
    dx, dy, _, _, _ = _axis_distances(cells, feat_shape, patch_size, cfg)
    return ((dy == 0)[:, :, None] & (dx == 0)[:, None, :]).reshape(boxes.shape[0], dx.shape[1] * dy.shape[1])


def merge_target_masks(masks: Tensor, batch_idx: Tensor, batch_size: int) -> Tensor:
    """Y[b, p] = max over image b's boxes of M_i[p]; 0 for an image without boxes. [N, P] -> [B, P]."""
    target = masks.new_zeros(batch_size, masks.shape[1])
    if masks.shape[0] == 0:
        return target
    index = batch_idx[:, None].expand_as(masks)
    return target.scatter_reduce(0, index, masks, reduce='amax', include_self=True)


def generate_soft_target_mask(gt_bboxes: list, feat_shape, img_shape, patch_size: int,
                              cfg: CASSConfig) -> Tensor:
    """Merged soft target of a batch: list of B tensors [N_b, 4] -> Y [B, P]."""
    boxes, batch_idx = pack_boxes(gt_bboxes)
    masks = soft_target_masks(boxes, batch_idx, feat_shape, img_shape, patch_size, cfg)
    return merge_target_masks(masks, batch_idx, len(gt_bboxes))


# ------------------------------------------------------------------------------------------ per-patch loss
def per_patch_loss(logits: Tensor, target: Tensor, cfg: CASSConfig) -> Tensor:
    """Elementwise l(z, y) of cfg.loss_type; logits and target broadcast, result has their shape.

    mse:   (q - y)^2
    focal: -(1-q)^alpha log(q) y - q^beta log(1-q) (1-y)
    vfl:   y > 0: -y (y log q + (1-y) log(1-q));  y = 0: -alpha q^beta log(1-q)
    log q and log(1-q) come from logsigmoid(+-z), so there is no log(0).
    """
    if cfg.loss_type == 'mse':
        return (torch.sigmoid(logits) - target) ** 2
    log_q, log_1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
    q, one_minus_q = torch.sigmoid(logits), torch.sigmoid(-logits)
    if cfg.loss_type == 'focal':
        return -(one_minus_q ** cfg.focal_alpha) * log_q * target \
            - (q ** cfg.focal_beta) * log_1mq * (1 - target)
    positive = -target * (target * log_q + (1 - target) * log_1mq)
    negative = -cfg.focal_alpha * q ** cfg.focal_beta * log_1mq
    return torch.where(target > 0, positive, negative)


def _loss_polynomial(logits: Tensor, cfg: CASSConfig) -> dict:
    """l(z, y) written as [y = 0] e(z) + [y > 0] (c0(z) + c1(z) y + c2(z) y^2), coefficient maps [B, P].

    Returns a dict with 'e', 'c1' always, 'c2' and 'c0_minus_e' only where non-zero:
      focal: e = c0 = -q^beta log(1-q), c1 = -(1-q)^alpha log q - e            (linear, continuous at 0)
      mse:   e = c0 = q^2,              c1 = -2 q,  c2 = 1                      (quadratic, continuous)
      vfl:   e = -alpha q^beta log(1-q), c0 = 0, c1 = -log(1-q), c2 = log(1-q) - log q  (jump at y = 0)
    """
    log_q, log_1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
    q = torch.sigmoid(logits)
    if cfg.loss_type == 'focal':
        e = -(q ** cfg.focal_beta) * log_1mq
        return {'e': e, 'c1': -(torch.sigmoid(-logits) ** cfg.focal_alpha) * log_q - e}
    if cfg.loss_type == 'mse':
        return {'e': q * q, 'c1': -2.0 * q, 'c2': torch.ones_like(q)}
    e = -cfg.focal_alpha * q ** cfg.focal_beta * log_1mq
    return {'e': e, 'c1': -log_1mq, 'c2': log_1mq - log_q, 'c0_minus_e': -e}


def _per_box_dot(masks: Tensor, batch_idx: Tensor, maps: Tensor) -> Tensor:
    """out[n] = sum_p masks[n, p] * maps[batch_idx[n], p]: [N, P] x [B, P] -> [N].

    One [N, P] @ [P, B] matmul then a gather of each box's own image column; this uses BLAS and its
    backward is another matmul, cheaper than materialising maps[batch_idx] ([N, P]) on both passes.
    """
    return (masks @ maps.transpose(0, 1)).gather(1, batch_idx[:, None]).squeeze(1)


def per_object_loss_sums(logits: Tensor, masks: Tensor, batch_idx: Tensor, cfg: CASSConfig) -> Tensor:
    """S_i = sum_p l(z[b_i, p], M_i[p]) for every box without building l on [N, P].

    logits [B, P], masks [N, P], batch_idx [N] -> [N]. Uses the polynomial form of `_loss_polynomial`.
    """
    coef = _loss_polynomial(logits, cfg)
    sums = coef['e'].sum(1)[batch_idx] + _per_box_dot(masks, batch_idx, coef['c1'])
    if 'c2' in coef:
        sums = sums + _per_box_dot(masks * masks, batch_idx, coef['c2'])
    if 'c0_minus_e' in coef:
        sums = sums + _per_box_dot((masks > 0).to(masks.dtype), batch_idx, coef['c0_minus_e'])
    return sums


# ---------------------------------------------------------------------------------------- normalisations
def _prepare(logits: Tensor, gt_bboxes: list, feat_shape, img_shape, patch_size: int, cfg: CASSConfig,
             masks):
    """Shared set-up: float logits, packed boxes and the [N, P] masks (computed unless given)."""
    ph, pw = patch_grid(feat_shape, patch_size)
    if logits.dim() != 2 or logits.shape[1] != ph * pw or logits.shape[0] != len(gt_bboxes):
        raise ValueError(f"CASS: logits have shape {tuple(logits.shape)}, expected [B={len(gt_bboxes)}, "
                         f"P={ph * pw}] for feat_shape={tuple(feat_shape)} and patch_size={patch_size}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    boxes, batch_idx = pack_boxes(gt_bboxes)
    boxes, batch_idx = boxes.to(z.device, z.dtype), batch_idx.to(z.device)
    if masks is None:
        masks = soft_target_masks(boxes, batch_idx, feat_shape, img_shape, patch_size, cfg)
    elif masks.shape != (boxes.shape[0], ph * pw):
        raise ValueError(f"CASS: precomputed masks have shape {tuple(masks.shape)}, expected "
                         f"[N={boxes.shape[0]}, P={ph * pw}]")
    return z, boxes, batch_idx, masks.to(z.dtype)


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
    z, _, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    return per_patch_loss(z, target, cfg).mean()


def cass_loss_object(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object': (1/N) sum_i mean_p l(z[b_i], M_i). Other boxes' patches are negatives of box i."""
    z, _, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    return per_object_loss_sums(z, masks, batch_idx, cfg).sum() / masks.numel()


def cass_loss_object_area(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object_area': sum_i w_i L_i / sum_i w_i, L_i as in 'object', w_i = clipped box area / (H W).

    A weighted mean (not the seeds' literal sum_i w_i L_i / N, which shrinks by the mean area fraction);
    0 if every box has zero area.
    """
    z, boxes, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    per_object = per_object_loss_sums(z, masks, batch_idx, cfg) / masks.shape[1]
    weights = box_area_fraction(boxes, img_shape)
    return (weights * per_object).sum() / weights.sum().clamp(min=_EPS)


def patch_area_weight(gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None) -> Tensor:
    """a_p of the spec: normalised (clipped) area of the largest box of the image with M_i[p] > 0, else 0.

    Returns [B, P] (dtype of the boxes, float32 at least).
    """
    boxes, batch_idx = pack_boxes(gt_bboxes)
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    if masks is None:
        masks = soft_target_masks(boxes, batch_idx, feat_shape, img_shape, patch_size, cfg)
    return _largest_covering_area(masks.to(boxes.dtype), boxes, batch_idx.to(masks.device), img_shape,
                                  len(gt_bboxes))


def _largest_covering_area(masks, boxes, batch_idx, img_shape, batch_size):
    """[N, P] masks -> [B, P]: max over the image's boxes with M_i[p] > 0 of their area fraction, else 0."""
    areas = torch.where(masks > 0, box_area_fraction(boxes, img_shape)[:, None], 0.0)
    return merge_target_masks(areas, batch_idx, batch_size)


def cass_loss_area_patch(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'area_patch': sum_{a>0} a_p l(z, Y) / sum a_p + bg_weight * mean_{Y=0} l(z, 0), over all (b, p)."""
    z, boxes, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    area_weight = _largest_covering_area(masks, boxes, batch_idx, img_shape, z.shape[0])
    foreground = (area_weight * per_patch_loss(z, target, cfg)).sum() / area_weight.sum().clamp(min=_EPS)
    return foreground + _background_term(z, target, cfg)


def _per_object_mean_loss(z, masks, batch_idx, target, cfg):
    """sum_p M_i[p] l(z, Y)[b_i, p] / sum_p M_i[p] -> ([N], mask mass [N]); 0 for an empty mask."""
    mass = masks.sum(1)
    weighted = _per_box_dot(masks, batch_idx, per_patch_loss(z, target, cfg))
    return weighted / mass.clamp(min=_EPS), mass


def cass_loss_object_balanced(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None):
    """'object_balanced': (1/N) sum_i [sum_p M_i l(z, Y) / sum_p M_i] + bg_weight * mean_{Y=0} l(z, 0).

    Each object weighs 1/N whatever its size; a box whose mask is empty (e.g. outside the image) adds 0
    but still counts in N.
    """
    z, _, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, masks)
    if masks.shape[0] == 0:
        return _zero_loss(logits)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    per_object, _ = _per_object_mean_loss(z, masks, batch_idx, target, cfg)
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

    logits_per_level: list of L tensors [B, P_l]; feat_shapes: list of L (h_l, w_l). Each level builds its
    own masks from the same pixel boxes. The mean (not the sum) keeps the loss scale independent of how
    many levels are pruned. (A loop over the 1-3 levels, not over boxes.)
    """
    if len(logits_per_level) != len(feat_shapes) or not feat_shapes:
        raise ValueError(f"cass_loss_levels: {len(logits_per_level)} logit tensors for {len(feat_shapes)} "
                         f"feature shapes; pass one (h, w) per pruned level")
    losses = [cass_loss(z, gt_bboxes, shape, img_shape, patch_size, cfg)
              for z, shape in zip(logits_per_level, feat_shapes)]
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------- diagnostics
def size_bucket(area_pixels: Tensor) -> Tensor:
    """COCO size bucket of areas in input pixels: 0 small (< 32^2), 1 medium, 2 large (>= 96^2). [N] -> long."""
    return (area_pixels >= SMALL_AREA).long() + (area_pixels >= LARGE_AREA).long()


def _patch_centres_pixels(feat_shape, img_shape, patch_size, device, dtype):
    """Patch centres in input pixels, flattened row-major: (cy [P], cx [P])."""
    cy, cx = patch_centres(feat_shape, patch_size, device, dtype)
    sy, sx = img_shape[0] / feat_shape[0], img_shape[1] / feat_shape[1]
    return (cy[:, None] * sy).expand(-1, cx.shape[0]).reshape(-1), (cx[None, :] * sx).expand(cy.shape[0], -1) \
        .reshape(-1)


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
    z, boxes, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, None)
    target = merge_target_masks(masks, batch_idx, z.shape[0])
    loss = per_patch_loss(z, target, cfg)
    cy, cx = _patch_centres_pixels(feat_shape, img_shape, patch_size, z.device, z.dtype)
    H, W = img_shape
    regions = {'top_left_loss': (cx < W / 2) & (cy < H / 2), 'bottom_loss': cy >= H / 2}
    stats = {}
    for key, region in regions.items():
        count = region.to(z.dtype).sum() * z.shape[0]
        stats[key] = (loss * region).sum() / count.clamp(min=1)
        stats[key + '_count'] = count
    per_object, mass = _per_object_mean_loss(z, masks, batch_idx, target, cfg)
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


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
    """bool [B, P], True on each row's k highest scores; ties go to the lower patch index (stable sort)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


@torch.no_grad()
def keep_bias_stats(logits, gt_bboxes, feat_shape, img_shape, patch_size, keep_ratio, cfg, min_patches=1) -> dict:
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
    Centroids are in normalised image coordinates (x / W, y / H of patch centres).
    K = keep_count(P, keep_ratio, min_patches).
    """
    z, boxes, batch_idx, masks = _prepare(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg, None)
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
        kept = _top_k_mask(scores, k).to(z.dtype)
        recall = _per_box_dot(core, batch_idx, kept) / core_count.clamp(min=1)
        for names, group in ((SIZE_BUCKETS, bucket), (REGIONS, region)):
            sums, counts = _bucket_sums(recall, group, has_core, len(names))
            for g, name in enumerate(names):
                stats[f'{prefix}_{name}_sum'] = sums[g]
                stats[f'boxes_{name}_count'] = counts[g]
    stats['boxes_without_core_count'] = (~has_core).sum().to(z.dtype)
    cy, cx = _patch_centres_pixels(feat_shape, img_shape, patch_size, z.device, z.dtype)
    cy, cx = cy / H, cx / W
    has_box = (target.sum(1) > 0).to(z.dtype)
    for name, weights in (('q', torch.sigmoid(z)), ('target', target)):
        mass = weights.sum(1).clamp(min=_EPS)
        stats[f'centroid_{name}_x_sum'] = ((weights @ cx) / mass * has_box).sum()
        stats[f'centroid_{name}_y_sum'] = ((weights @ cy) / mass * has_box).sum()
    stats['centroid_images_count'] = has_box.sum()
    return stats


def finalize_keep_bias(sums: dict) -> dict:
    """Accumulated `keep_bias_stats` sums -> floats.

    Returns keep_recall_{small,medium,large,far,near}, oracle_keep_recall_{...}, centroid_dx, centroid_dy
    (centroid of q minus centroid of Y, normalised image coordinates; dy < 0 = the scores sit higher than
    the target), plus the counts num_boxes_{...}, num_boxes_without_core, num_images_centroid. A ratio over
    an empty group is 0.0 (its count says so).
    """
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
    out['num_boxes_without_core'] = value['boxes_without_core_count']
    out['num_images_centroid'] = images
    return out
