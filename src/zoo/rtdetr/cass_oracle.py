"""Slow per-box loop reference of the CASS maths (docs/cass_maths.md), written from the spec only.

Used by tests/test_cass.py and bench/cass_loss_bench.py, never by training code. Two levels:
- `box_mask_scalar`: plain Python floats, one loop over patches (the most literal reading of the spec);
- `box_mask` and the `oracle_*` functions: a Python loop over images and boxes, each box handled as a
  [P] torch vector (differentiable in the logits), as a straightforward seed-style implementation would be.
Nothing here imports from src.zoo.rtdetr.cass except the config dataclass.
"""
import math

import torch
import torch.nn.functional as F

SMALL, LARGE = 32.0 ** 2, 96.0 ** 2


# --------------------------------------------------------------------------------------------- masks
def _process_box(box, feat_shape, img_shape, cfg):
    """Spec steps 1, 5, 2 on one box (floats): pixels -> cells, optional outward snap, min-size widening."""
    h, w = feat_shape
    H, W = img_shape
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = x1 / (W / w), x2 / (W / w)
    y1, y2 = y1 / (H / h), y2 / (H / h)
    if not cfg.use_subpixel_offset:
        x1, y1, x2, y2 = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    if x2 - x1 < cfg.min_size:
        c = (x1 + x2) / 2
        x1, x2 = c - cfg.min_size / 2, c + cfg.min_size / 2
    if y2 - y1 < cfg.min_size:
        c = (y1 + y2) / 2
        y1, y2 = c - cfg.min_size / 2, c + cfg.min_size / 2
    return x1, y1, x2, y2


def grid_shape(feat_shape, patch_size):
    return math.ceil(feat_shape[0] / patch_size), math.ceil(feat_shape[1] / patch_size)


def centres(feat_shape, patch_size):
    """List of (cx, cy) feature-cell centres, row-major; a partial last patch keeps (j + 0.5) k."""
    ph, pw = grid_shape(feat_shape, patch_size)
    return [((j + 0.5) * patch_size, (i + 0.5) * patch_size) for i in range(ph) for j in range(pw)]


def box_mask_scalar(box, feat_shape, img_shape, patch_size, cfg):
    """M_i as a list of P floats, one patch at a time."""
    x1, y1, x2, y2 = _process_box(box, feat_shape, img_shape, cfg)
    r = cfg.expansion_ratio
    rw, rh = r * (x2 - x1), r * (y2 - y1)
    norm = max(math.sqrt(rw ** 2 + rh ** 2), 1e-6)
    out = []
    for cx, cy in centres(feat_shape, patch_size):
        if x1 <= cx <= x2 and y1 <= cy <= y2:
            out.append(1.0)
        elif x1 - rw <= cx <= x2 + rw and y1 - rh <= cy <= y2 + rh:
            nearest_x = min(max(cx, x1), x2)
            nearest_y = min(max(cy, y1), y2)
            d = math.hypot(cx - nearest_x, cy - nearest_y) / norm
            out.append(math.exp(-d * d / (2 * 0.5 ** 2)) if cfg.decay_type == 'gaussian' else max(0.0, 1 - d))
        else:
            out.append(0.0)
    return out


def box_core_scalar(box, feat_shape, img_shape, patch_size, cfg):
    """Core indicator of one box as a list of P bools."""
    x1, y1, x2, y2 = _process_box(box, feat_shape, img_shape, cfg)
    return [x1 <= cx <= x2 and y1 <= cy <= y2 for cx, cy in centres(feat_shape, patch_size)]


def box_mask(box, feat_shape, img_shape, patch_size, cfg, dtype=torch.float64):
    """M_i of one box as a [P] tensor (non-separable: the 2-D distance is computed directly)."""
    x1, y1, x2, y2 = _process_box(box, feat_shape, img_shape, cfg)
    ph, pw = grid_shape(feat_shape, patch_size)
    ii, jj = torch.meshgrid(torch.arange(ph, dtype=dtype), torch.arange(pw, dtype=dtype), indexing='ij')
    cx, cy = ((jj + 0.5) * patch_size).reshape(-1), ((ii + 0.5) * patch_size).reshape(-1)
    r = cfg.expansion_ratio
    rw, rh = r * (x2 - x1), r * (y2 - y1)
    norm = max(math.sqrt(rw ** 2 + rh ** 2), 1e-6)
    core = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
    band = (cx >= x1 - rw) & (cx <= x2 + rw) & (cy >= y1 - rh) & (cy <= y2 + rh)
    d = torch.hypot(cx - cx.clamp(x1, x2), cy - cy.clamp(y1, y2)) / norm
    decay = torch.exp(-d ** 2 / 0.5) if cfg.decay_type == 'gaussian' else (1 - d).clamp(min=0)
    return torch.where(core, torch.ones_like(d), torch.where(band, decay, torch.zeros_like(d)))


def area_fraction(box, img_shape):
    """Box area clipped to the H x W input, / (H W)."""
    H, W = img_shape
    x1, y1, x2, y2 = (float(v) for v in box)
    wid = max(0.0, min(x2, W) - max(x1, 0.0))
    hei = max(0.0, min(y2, H) - max(y1, 0.0))
    return wid * hei / (H * W)


def image_target(boxes, feat_shape, img_shape, patch_size, cfg, dtype=torch.float64):
    """Y of one image: elementwise max of its box masks, zeros without boxes. [P]."""
    ph, pw = grid_shape(feat_shape, patch_size)
    y = torch.zeros(ph * pw, dtype=dtype)
    for box in boxes:
        y = torch.maximum(y, box_mask(box, feat_shape, img_shape, patch_size, cfg, dtype))
    return y


# ------------------------------------------------------------------------------------------------ losses
def patch_loss(z, y, cfg):
    """l(z, y) elementwise, straight from the spec's formulas."""
    q = torch.sigmoid(z)
    log_q, log_1mq = F.logsigmoid(z), F.logsigmoid(-z)
    if cfg.loss_type == 'mse':
        return (q - y) ** 2
    if cfg.loss_type == 'focal':
        return -((1 - q) ** cfg.focal_alpha) * log_q * y - (q ** cfg.focal_beta) * log_1mq * (1 - y)
    positive = -y * (y * log_q + (1 - y) * log_1mq)
    negative = -cfg.focal_alpha * q ** cfg.focal_beta * log_1mq
    return torch.where(torch.as_tensor(y) > 0, positive, negative)


def _background(logits, targets, cfg):
    total, count = logits.new_zeros(()), 0
    for z, y in zip(logits, targets):
        neg = y == 0
        total = total + patch_loss(z[neg], torch.zeros_like(z[neg]), cfg).sum()
        count += int(neg.sum())
    return cfg.bg_weight * total / max(count, 1)


def oracle_cass_loss(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg):
    """The CASS loss of cfg.normalization (plus spatial_reg), looping over images and boxes."""
    logits = logits.to(torch.float64) if logits.dtype == torch.float64 else logits.float()
    dt = logits.dtype
    n_total = sum(len(b) for b in gt_bboxes)
    ph, pw = grid_shape(feat_shape, patch_size)
    if n_total == 0:
        loss = logits.sum() * 0
    else:
        mode = cfg.normalization
        targets = [image_target(b, feat_shape, img_shape, patch_size, cfg, dt) for b in gt_bboxes]
        if mode == 'patch':
            loss = sum(patch_loss(z, y, cfg).sum() for z, y in zip(logits, targets)) / (len(gt_bboxes) * ph * pw)
        elif mode in ('object', 'object_area'):
            num, den = 0.0, 0.0
            for z, boxes in zip(logits, gt_bboxes):
                for box in boxes:
                    m = box_mask(box, feat_shape, img_shape, patch_size, cfg, dt)
                    w = area_fraction(box, img_shape) if mode == 'object_area' else 1.0
                    num = num + w * patch_loss(z, m, cfg).mean()
                    den += w
            loss = num / den if den > 0 else logits.sum() * 0
        elif mode == 'area_patch':
            num, den = 0.0, 0.0
            for z, y, boxes in zip(logits, targets, gt_bboxes):
                a = torch.zeros(ph * pw, dtype=dt)
                for box in boxes:
                    m = box_mask(box, feat_shape, img_shape, patch_size, cfg, dt)
                    a = torch.where(m > 0, torch.clamp(a, min=area_fraction(box, img_shape)), a)
                sel = a > 0
                num = num + (a[sel] * patch_loss(z[sel], y[sel], cfg)).sum()
                den += float(a.sum())
            loss = num / max(den, 1e-12) + _background(logits, targets, cfg)
        elif mode == 'object_balanced':
            total = 0.0
            for z, y, boxes in zip(logits, targets, gt_bboxes):
                per_patch = patch_loss(z, y, cfg)
                for box in boxes:
                    m = box_mask(box, feat_shape, img_shape, patch_size, cfg, dt)
                    if float(m.sum()) > 0:
                        total = total + (m * per_patch).sum() / m.sum()
            loss = total / n_total + _background(logits, targets, cfg)
        else:
            raise ValueError(mode)
    if cfg.spatial_reg > 0:
        q = torch.sigmoid(logits).reshape(-1, ph, pw)
        reg = 0.0
        if ph > 1:
            reg = reg + (q[:, 1:] - q[:, :-1]).abs().mean()
        if pw > 1:
            reg = reg + (q[:, :, 1:] - q[:, :, :-1]).abs().mean()
        loss = loss + cfg.spatial_reg * reg
    return loss


# ------------------------------------------------------------------------------------------- diagnostics
def _bucket(box, img_shape):
    H, W = img_shape
    area = area_fraction(box, img_shape) * H * W
    return 'small' if area < SMALL else ('medium' if area < LARGE else 'large')


def oracle_spatial_stats(logits, gt_bboxes, feat_shape, img_shape, patch_size, cfg):
    """Same keys as cass_spatial_stats, as Python floats."""
    H, W = img_shape
    sy, sx = H / feat_shape[0], W / feat_shape[1]
    acc = {k: [0.0, 0] for k in ('top_left_loss', 'bottom_loss', 'small_obj_loss', 'medium_obj_loss',
                                 'large_obj_loss')}
    with torch.no_grad():
        for z, boxes in zip(logits.double(), gt_bboxes):
            y = image_target(boxes, feat_shape, img_shape, patch_size, cfg)
            per_patch = patch_loss(z, y, cfg)
            for p, (cx, cy) in enumerate(centres(feat_shape, patch_size)):
                if cx * sx < W / 2 and cy * sy < H / 2:
                    acc['top_left_loss'][0] += float(per_patch[p])
                    acc['top_left_loss'][1] += 1
                if cy * sy >= H / 2:
                    acc['bottom_loss'][0] += float(per_patch[p])
                    acc['bottom_loss'][1] += 1
            for box in boxes:
                m = box_mask(box, feat_shape, img_shape, patch_size, cfg)
                if float(m.sum()) > 0:
                    key = _bucket(box, img_shape) + '_obj_loss'
                    acc[key][0] += float((m * per_patch).sum() / m.sum())
                    acc[key][1] += 1
    out = {}
    for k, (s, c) in acc.items():
        out[k] = s / c if c else 0.0
        out[k + '_count'] = float(c)
    return out


def _top_k(values, k):
    """Indices of the k largest values; ties go to the lower index."""
    return set(sorted(range(len(values)), key=lambda p: (-values[p], p))[:k])


def oracle_keep_bias(logits, gt_bboxes, feat_shape, img_shape, patch_size, keep_ratio, cfg, min_patches=1):
    """Final keep-bias figures (what finalize_keep_bias(keep_bias_stats(...)) returns) for one batch."""
    H, W = img_shape
    sy, sx = H / feat_shape[0], W / feat_shape[1]
    P = len(centres(feat_shape, patch_size))
    k = min(P, max(min_patches, math.ceil(keep_ratio * P)))
    groups = {g: [0.0, 0.0, 0] for g in ('small', 'medium', 'large', 'far', 'near')}
    no_core = 0
    cent = [0.0, 0.0, 0]
    shares = {'target_bottom_share': 0.0, 'kept_bottom_share': 0.0, 'target_positive_share': 0.0,
              'keep_fraction': 0.0}
    for z, boxes in zip(logits.double(), gt_bboxes):
        y = image_target(boxes, feat_shape, img_shape, patch_size, cfg)
        zl, yl = [float(v) for v in z], [float(v) for v in y]
        kept, kept_oracle = _top_k(zl, k), _top_k(yl, k)
        for box in boxes:
            core = [p for p, c in enumerate(box_core_scalar(box, feat_shape, img_shape, patch_size, cfg)) if c]
            if not core:
                no_core += 1
                continue
            recall = sum(p in kept for p in core) / len(core)
            recall_oracle = sum(p in kept_oracle for p in core) / len(core)
            region = 'far' if (float(box[1]) + float(box[3])) / 2 < H / 2 else 'near'
            for g in (_bucket(box, img_shape), region):
                groups[g][0] += recall
                groups[g][1] += recall_oracle
                groups[g][2] += 1
        if sum(yl) > 0:
            q = [1 / (1 + math.exp(-v)) for v in zl]
            pts = [(cx * sx / W, cy * sy / H) for cx, cy in centres(feat_shape, patch_size)]
            for weights, sign in ((q, 1.0), (yl, -1.0)):
                mass = sum(weights)
                cent[0] += sign * sum(wt * px for wt, (px, _) in zip(weights, pts)) / mass
                cent[1] += sign * sum(wt * py for wt, (_, py) in zip(weights, pts)) / mass
            cent[2] += 1
            bottom = [cy * sy >= H / 2 for _, cy in centres(feat_shape, patch_size)]
            shares['target_bottom_share'] += sum(v for v, b in zip(yl, bottom) if b) / sum(yl)
            shares['kept_bottom_share'] += sum(bottom[p] for p in kept) / k
            shares['target_positive_share'] += sum(v > 0 for v in yl) / P
            shares['keep_fraction'] += k / P
    out = {}
    for g, (s, so, c) in groups.items():
        out[f'keep_recall_{g}'] = s / c if c else 0.0
        out[f'oracle_keep_recall_{g}'] = so / c if c else 0.0
        out[f'num_boxes_{g}'] = float(c)
    out['centroid_dx'] = cent[0] / cent[2] if cent[2] else 0.0
    out['centroid_dy'] = cent[1] / cent[2] if cent[2] else 0.0
    out.update({name: v / cent[2] if cent[2] else 0.0 for name, v in shares.items()})
    out['bottom_keep_ratio'] = (out['kept_bottom_share'] / out['target_bottom_share']
                                if out['target_bottom_share'] else 0.0)
    out['num_boxes_without_core'] = float(no_core)
    out['num_images_centroid'] = float(cent[2])
    return out
