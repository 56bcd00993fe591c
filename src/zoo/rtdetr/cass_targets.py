"""CASS targets: the config, the patch geometry and the per-box soft masks of docs/cass_maths.md.

The DSET pruner predicts one importance logit per patch; CASS supervises those logits with a soft mask built
from the ground-truth boxes. Everything here is a pure function of tensors. The losses live in `cass_losses.py`, the keep-bias metrics in
`cass_metrics.py`; `cass.py` re-exports all three (the public API `PatchLevelPruner` and the tests use).

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
from torch import Tensor

from src.misc.transfer import tensor_on, to_device

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
    batch_idx = to_device(torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long),
                                                  output_size=sum(counts)), device)
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
    stride = tensor_on([W / w, H / h, W / w, H / h], boxes.device, boxes.dtype)  # no blocking copy
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


def per_box_dot(masks: Tensor, batch_idx: Tensor, maps: Tensor) -> Tensor:
    """out[n] = sum_p masks[n, p] * maps[batch_idx[n], p]: [N, P] x [B, P] -> [N].

    One [N, P] @ [P, B] matmul then a gather of each box's own image column; this uses BLAS and its
    backward is another matmul, cheaper than materialising maps[batch_idx] ([N, P]) on both passes.
    """
    return (masks @ maps.transpose(0, 1)).gather(1, batch_idx[:, None]).squeeze(1)



def prepare_batch(logits: Tensor, gt_bboxes: list, feat_shape, img_shape, patch_size: int, cfg: CASSConfig,
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



def patch_area_weight(gt_bboxes, feat_shape, img_shape, patch_size, cfg, *, masks=None) -> Tensor:
    """a_p of the spec: normalised (clipped) area of the largest box of the image with M_i[p] > 0, else 0.

    Returns [B, P] (dtype of the boxes, float32 at least).
    """
    boxes, batch_idx = pack_boxes(gt_bboxes)
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    if masks is None:
        masks = soft_target_masks(boxes, batch_idx, feat_shape, img_shape, patch_size, cfg)
    return largest_covering_area(masks.to(boxes.dtype), boxes, batch_idx.to(masks.device), img_shape,
                                  len(gt_bboxes))


def largest_covering_area(masks, boxes, batch_idx, img_shape, batch_size):
    """[N, P] masks -> [B, P]: max over the image's boxes with M_i[p] > 0 of their area fraction, else 0."""
    areas = torch.where(masks > 0, box_area_fraction(boxes, img_shape)[:, None], 0.0)
    return merge_target_masks(areas, batch_idx, batch_size)




def size_bucket(area_pixels: Tensor) -> Tensor:
    """COCO size bucket of areas in input pixels: 0 small (< 32^2), 1 medium, 2 large (>= 96^2). [N] -> long."""
    return (area_pixels >= SMALL_AREA).long() + (area_pixels >= LARGE_AREA).long()


def patch_centres_pixels(feat_shape, img_shape, patch_size, device, dtype):
    """Patch centres in input pixels, flattened row-major: (cy [P], cx [P])."""
    cy, cx = patch_centres(feat_shape, patch_size, device, dtype)
    sy, sx = img_shape[0] / feat_shape[0], img_shape[1] / feat_shape[1]
    return (cy[:, None] * sy).expand(-1, cx.shape[0]).reshape(-1), (cx[None, :] * sx).expand(cy.shape[0], -1) \
        .reshape(-1)

