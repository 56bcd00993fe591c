"""DSET patch-level token pruner: keep the top-k patches of a feature map before the encoder attention.

The h x w map is cut into k x k patches (k = ``patch_size``), a grid of P_h = ceil(h/k) by P_w = ceil(w/k)
patches, the last row/column possibly partial. An MLP scores every token with one logit; a patch's logit
is the mean over its real tokens (padding cells of a partial patch are excluded). The top
``min(P, max(min_patches, ceil(ratio * P)))`` patches (``cass.keep_count``) are kept with all their tokens.

Kept tokens come in a fixed layout of ``k * k`` slots per kept patch (row-major inside the patch, patches
in ascending patch index, i.e. raster order), so ``K = num_kept_patches * k^2``. A slot that falls outside
the map (partial patch) is marked False in ``info['kept_valid']``; its index is clamped to the nearest real
cell of the same patch (row ``min(r, h-1)``, column ``min(c, w-1)``), so every index is a real token and
the slot's token is a duplicate that the encoder must mask (key padding) and not scatter back.

Straight-through gate: kept tokens are multiplied by ``1 + s - stopgrad(s)`` with s = sigmoid(patch logit),
written as ``x + x * (s - stopgrad(s))`` so the forward values are bit-identical to the gathered tokens
while the detection loss sends ``dL/ds = <dL/dx, x>`` to the importance predictor. Without autograd (inference,
export) the gate is skipped: it changes no value.

The CASS loss supervising the patch logits lives in ``cass.py`` (maths in docs/cass_maths.md);
the seeds' method names are kept here as thin wrappers.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.nn.mlp import MLP
from src.zoo.rtdetr import cass


def patch_mean_logits(token_logits: Tensor, spatial_shape: Tuple[int, int], patch_size: int) -> Tensor:
    """Mean of each patch's real-token logits.

    Args:
        token_logits: [B, h*w] (row-major flatten of the h x w map).
        spatial_shape: (h, w).
        patch_size: k.
    Returns:
        [B, P] with P = ceil(h/k) * ceil(w/k), patches in row-major order.
    """
    h, w = spatial_shape
    p_h, p_w = cass.patch_grid((h, w), patch_size)
    pad = (0, p_w * patch_size - w, 0, p_h * patch_size - h)
    grid = F.pad(token_logits.reshape(-1, h, w), pad)                         # zeros on padding cells
    sums = grid.reshape(-1, p_h, patch_size, p_w, patch_size).sum((2, 4))
    ones = F.pad(token_logits.new_ones(1, h, w), pad)
    counts = ones.reshape(1, p_h, patch_size, p_w, patch_size).sum((2, 4))  # real cells per patch (>= 1)
    return (sums / counts).flatten(1)


def patch_token_index(kept_patch_idx: Tensor, spatial_shape: Tuple[int, int], patch_size: int):
    """Token indices of the k x k slots of each kept patch.

    Args:
        kept_patch_idx: [B, n] long patch indices into the P_h x P_w grid (row-major).
        spatial_shape: (h, w).
        patch_size: k.
    Returns:
        token_idx [B, n * k^2] long into h*w, always a real cell (slots off the map are clamped to the
        nearest real cell of the same patch); valid [B, n * k^2] bool, False for slots off the map.
    """
    h, w = spatial_shape
    k = patch_size
    p_w = cass.patch_grid((h, w), k)[1]
    offset = torch.arange(k, device=kept_patch_idx.device)
    d_row, d_col = offset.repeat_interleave(k), offset.repeat(k)               # [k^2], row-major in patch
    rows = (kept_patch_idx // p_w).unsqueeze(-1) * k + d_row                    # [B, n, k^2]
    cols = (kept_patch_idx % p_w).unsqueeze(-1) * k + d_col
    valid = (rows < h) & (cols < w)
    token_idx = rows.clamp(max=h - 1) * w + cols.clamp(max=w - 1)
    return token_idx.flatten(1), valid.flatten(1)


class PatchLevelPruner(nn.Module):
    """Keep the top-k patches of a flattened feature map by a learned importance logit.

    ``forward(tokens [B, h*w, C], (h, w)) -> (kept_tokens [B, K, C], kept_idx [B, K] long, info)``.

    Keep-ratio schedule (W = ``token_pruning_warmup_epochs``, r = ``keep_ratio``, e = epoch)::

        current_keep_ratio = 1 - (1 - r) * clamp((e - W) / W, 0, 1)      (W > 0)
                           = r                                           (W = 0)

    i.e. 1.0 for e < W (and at e = W), a linear ramp over [W, 2W), r from e = 2W on. Before any
    ``set_epoch`` call the schedule counts as finished (r), the right setting for evaluation scripts;
    the training loop must call ``set_epoch`` every epoch. The same ratio applies in eval mode when
    ``prune_in_eval`` is true; with it false, eval keeps every token.
    When every patch would be kept (ratio 1, warmup, or eval without pruning) the layer returns the
    input unchanged: all h*w tokens, ``kept_idx = arange(h*w)``, all valid, no gate.

    ``info`` keys: ``patch_importance_scores`` [B, P] patch LOGITS (with grad, for CASS),
    ``patch_grid`` (P_h, P_w), ``feat_shape`` (h, w), ``keep_ratio`` float (the ratio applied; 1.0 when
    not pruning), ``pruned`` bool, ``num_kept_patches`` int, ``num_kept_tokens`` 0-dim float tensor
    (valid kept tokens, mean over the batch), ``kept_patch_idx`` [B, n] long (ascending),
    ``kept_valid`` [B, K] bool.
    """

    def __init__(self, input_dim: int = 256, patch_size: int = 4, keep_ratio: float = 0.3, min_patches: int = 1,
                 prune_in_eval: bool = True, token_pruning_warmup_epochs: int = 0,
                 straight_through_gate: bool = True, use_cass: bool = True, cass_expansion_ratio: float = 0.8,
                 cass_min_size: float = 2.0, cass_decay_type: str = "gaussian", use_subpixel_offset: bool = True,
                 cass_loss_type: str = "focal", cass_focal_alpha: float = 2.0, cass_focal_beta: float = 4.0,
                 cass_normalization: str = "patch", cass_bg_weight: float = 1.0, cass_spatial_reg: float = 0.0):
        super().__init__()
        _check(isinstance(input_dim, int) and input_dim >= 4, "input_dim", input_dim,
               "an integer >= 4 (the predictor's hidden width is input_dim // 4)")
        _check(isinstance(patch_size, int) and patch_size >= 1, "patch_size", patch_size, "an integer >= 1")
        _check(isinstance(keep_ratio, (int, float)) and 0 < keep_ratio <= 1, "keep_ratio", keep_ratio, "in (0, 1]")
        _check(isinstance(min_patches, int) and min_patches >= 1, "min_patches", min_patches, "an integer >= 1")
        _check(isinstance(token_pruning_warmup_epochs, int) and token_pruning_warmup_epochs >= 0,
               "token_pruning_warmup_epochs", token_pruning_warmup_epochs, "an integer >= 0")
        self.input_dim, self.patch_size, self.keep_ratio = input_dim, patch_size, float(keep_ratio)
        self.min_patches, self.prune_in_eval = min_patches, prune_in_eval
        self.token_pruning_warmup_epochs = token_pruning_warmup_epochs
        self.straight_through_gate, self.use_cass = straight_through_gate, use_cass
        try:  # CASSConfig validates the cass_* values (choices, finite and >= 0) naming the dset key
            self._cass_config = cass.CASSConfig(
                expansion_ratio=cass_expansion_ratio, min_size=cass_min_size,
                decay_type=cass_decay_type, use_subpixel_offset=use_subpixel_offset, loss_type=cass_loss_type,
                focal_alpha=cass_focal_alpha, focal_beta=cass_focal_beta,
                normalization=cass_normalization, bg_weight=cass_bg_weight,
                spatial_reg=cass_spatial_reg)
        except (TypeError, ValueError) as err:
            raise ValueError(f"PatchLevelPruner (dset.cass_* keys): {err}") from err
        self.importance_predictor = MLP(input_dim, input_dim // 4, 1, 2)
        self.epoch: Optional[int] = None
        self._last_patch_grid: Optional[Tuple[int, int]] = None

    # ---------------------------------------------------------------- schedule
    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    @property
    def current_keep_ratio(self) -> float:
        """See the class docstring for the formula."""
        warm = self.token_pruning_warmup_epochs
        if self.epoch is None or warm == 0:
            return self.keep_ratio
        progress = min(1.0, max(0.0, (self.epoch - warm) / warm))
        return 1.0 - (1.0 - self.keep_ratio) * progress

    @property
    def cass_config(self) -> cass.CASSConfig:
        return self._cass_config

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: Tensor, spatial_shape: Sequence[int]):
        h, w = int(spatial_shape[0]), int(spatial_shape[1])
        if tokens.dim() != 3 or tokens.shape[1] != h * w or tokens.shape[2] != self.input_dim:
            raise ValueError(f"PatchLevelPruner: tokens must be [B, h*w={h * w}, input_dim={self.input_dim}] "
                             f"for spatial_shape {(h, w)}, got {tuple(tokens.shape)}")
        batch = tokens.shape[0]
        token_logits = self.importance_predictor(tokens).squeeze(-1)
        token_logits = token_logits.to(torch.promote_types(token_logits.dtype, torch.float32))  # under autocast
        patch_logits = patch_mean_logits(token_logits, (h, w), self.patch_size)
        grid = cass.patch_grid((h, w), self.patch_size)
        num_patches = int(grid[0]) * int(grid[1])  # a Python int (also under tracing: a graph constant)
        self._last_patch_grid = tuple(grid)

        ratio = self.current_keep_ratio if (self.training or self.prune_in_eval) else 1.0
        n_keep = cass.keep_count(num_patches, ratio, self.min_patches)   # same rule as the keep-recall oracle
        info = {"patch_importance_scores": patch_logits, "patch_grid": tuple(grid), "feat_shape": (h, w)}
        if n_keep >= num_patches:
            idx = torch.arange(h * w, device=tokens.device).expand(batch, -1)
            info.update(keep_ratio=1.0, pruned=False, num_kept_patches=num_patches,
                        num_kept_tokens=torch.tensor(float(h * w), device=tokens.device),
                        kept_patch_idx=torch.arange(num_patches, device=tokens.device).expand(batch, -1),
                        kept_valid=torch.ones(batch, h * w, dtype=torch.bool, device=tokens.device))
            return tokens, idx, info

        kept_patch_idx = torch.topk(patch_logits.detach(), n_keep, dim=1).indices.sort(dim=1).values
        kept_idx, kept_valid = patch_token_index(kept_patch_idx, (h, w), self.patch_size)
        kept = torch.gather(tokens, 1, kept_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if self.straight_through_gate and torch.is_grad_enabled():  # value-neutral: skipped at inference
            s = torch.gather(patch_logits, 1, kept_patch_idx).sigmoid()
            gate = (s - s.detach()).repeat_interleave(self.patch_size ** 2, dim=1).unsqueeze(-1)
            kept = kept + kept * gate.to(kept.dtype)            # == kept in value, gradient reaches s
        info.update(keep_ratio=float(ratio), pruned=True, num_kept_patches=n_keep,
                    num_kept_tokens=kept_valid.sum(1).float().mean(), kept_patch_idx=kept_patch_idx,
                    kept_valid=kept_valid)
        return kept, kept_idx, info

    # ---------------------------------------------------------------- CASS (seeds' API, delegates to cass.py)
    def generate_soft_target_mask(self, gt_bboxes: List[Tensor], feat_shape, img_shape, device,
                                  expansion_ratio: Optional[float] = None, min_size: Optional[float] = None,
                                  decay_type: Optional[str] = None) -> Tensor:
        """Soft target Y [B, P] (docs/cass_maths.md); the optional arguments override the configured ones.

        gt_bboxes: list of [N_b, 4] absolute x1y1x2y2 pixels of the padded input of size img_shape (H, W).
        """
        overrides = {k: v for k, v in (("expansion_ratio", expansion_ratio), ("min_size", min_size),
                                       ("decay_type", decay_type)) if v is not None}
        cfg = dataclasses.replace(self.cass_config, **overrides) if overrides else self.cass_config
        boxes = [b.to(device) for b in gt_bboxes]
        return cass.generate_soft_target_mask(boxes, tuple(feat_shape), tuple(img_shape), self.patch_size, cfg)

    def compute_cass_loss(self, pred_scores: Tensor, target_mask: Tensor, reduction: str = "mean") -> Tensor:
        """Per-patch CASS loss of logits pred_scores [B, P] against a given target [B, P] ('patch' mode).

        reduction: 'mean' (scalar, the 'patch' normalisation without the spatial term), 'sum', or
        'none' ([B, P]).
        """
        loss = cass.per_patch_loss(pred_scores, target_mask, self.cass_config)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        raise ValueError(f"compute_cass_loss: reduction={reduction!r}, use 'mean', 'sum' or 'none'")

    def compute_cass_loss_object_normalized(self, pred_scores: Tensor, gt_bboxes: List[Tensor], feat_shape,
                                            img_shape) -> Tensor:
        """The 'object' normalisation (docs/cass_maths.md) of logits pred_scores [B, P]; scalar."""
        return cass.cass_loss_object(pred_scores, gt_bboxes, tuple(feat_shape), tuple(img_shape),
                                     self.patch_size, self.cass_config)

    def compute_cass_loss_from_info(self, info: dict, gt_bboxes: List[Tensor], feat_shape=None,
                                    img_shape=None) -> Tensor:
        """CASS loss of a forward's ``info`` with the configured ``cass_normalization``; scalar.

        feat_shape defaults to ``info['feat_shape']``; img_shape (H, W) of the padded input is required.
        """
        if img_shape is None:
            raise ValueError("compute_cass_loss_from_info: img_shape (H, W) of the padded input batch is required")
        feat_shape = tuple(info["feat_shape"] if feat_shape is None else feat_shape)
        grid = tuple(cass.patch_grid(feat_shape, self.patch_size))
        if tuple(info["patch_grid"]) != grid:
            raise ValueError(f"compute_cass_loss_from_info: feat_shape {feat_shape} gives patch grid {grid} but "
                             f"info has {tuple(info['patch_grid'])}; pass the pruned level's feature shape")
        return cass.cass_loss(info["patch_importance_scores"], gt_bboxes, feat_shape, tuple(img_shape),
                              self.patch_size, self.cass_config)

    def _compute_patch_area_weight(self, gt_bboxes: List[Tensor], feat_shape, img_shape, device) -> Tensor:
        """a_p [B, P] (docs/cass_maths.md, area_patch): normalised area of the largest box covering the patch."""
        boxes = [b.to(device) for b in gt_bboxes]
        return cass.patch_area_weight(boxes, tuple(feat_shape), tuple(img_shape), self.patch_size,
                                      self.cass_config)

    @torch.no_grad()
    def _debug_visualize_mask(self, target_mask: Tensor, pred_scores: Tensor, patch_grid=None,
                              image_index: int = 0) -> dict:
        """Pictures of one image for TensorBoard.

        Args:
            target_mask: [B, P] target Y; pred_scores: [B, P] logits.
            patch_grid: (P_h, P_w); defaults to the grid of the last forward.
        Returns:
            {'target': [P_h, P_w], 'pred': [P_h, P_w] sigmoid(logits), 'side_by_side': [P_h, 2 P_w + 1]
            (target | white column | pred)}, float32 numpy arrays in [0, 1]
            (``writer.add_image(tag, a, dataformats='HW')``).
        """
        grid = patch_grid if patch_grid is not None else self._last_patch_grid
        if grid is None:
            raise ValueError("_debug_visualize_mask: patch_grid unknown (no forward yet); pass patch_grid=(P_h, P_w)")
        p_h, p_w = grid
        target = target_mask[image_index].detach().float().reshape(p_h, p_w).cpu().numpy()
        pred = pred_scores[image_index].detach().float().sigmoid().reshape(p_h, p_w).cpu().numpy()
        side = np.concatenate([target, np.ones((p_h, 1), np.float32), pred], axis=1)
        return {"target": target, "pred": pred, "side_by_side": side}

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, patch_size={self.patch_size}, keep_ratio={self.keep_ratio}, "
                f"min_patches={self.min_patches}, warmup={self.token_pruning_warmup_epochs}, "
                f"prune_in_eval={self.prune_in_eval}, straight_through_gate={self.straight_through_gate}")


def _check(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ValueError(f"PatchLevelPruner: dset.{key} = {value!r} is invalid: must be {rule}")
