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

The pruner knows nothing of CASS: the loss supervising its patch logits is computed by ``DSETCriterion`` from
the output dict (``cass.py``, maths in docs/cass_maths.md). The seeds' names for the CASS functions are kept
at the end of this module as aliases of the functions training calls.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.nn.mlp import MLP
from src.nn.rows import gather_rows
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
    # one pooling op: ceil_mode adds the partial patches at the right / bottom edge, count_include_pad=False
    # divides each by its real cells (ONNX AveragePool has both attributes)
    means = F.avg_pool2d(token_logits.reshape(-1, 1, h, w), patch_size, stride=patch_size, ceil_mode=True,
                         count_include_pad=False)                                # [B, 1, P_h, P_w]
    return means.flatten(1)


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
                 straight_through_gate: bool = True):
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
        self.straight_through_gate = straight_through_gate
        self.importance_predictor = MLP(input_dim, input_dim // 4, 1, 2)
        self.epoch: Optional[int] = None

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

        ratio = self.current_keep_ratio if (self.training or self.prune_in_eval) else 1.0
        n_keep = cass.keep_count(num_patches, ratio, self.min_patches)   # same rule as the keep-recall oracle
        info = {"patch_importance_scores": patch_logits, "patch_grid": tuple(grid), "feat_shape": (h, w)}
        if n_keep >= num_patches:
            idx = torch.arange(h * w, device=tokens.device).expand(batch, -1)
            info.update(keep_ratio=1.0, pruned=False, num_kept_patches=num_patches,
                        num_kept_tokens=torch.full((), float(h * w), device=tokens.device),
                        kept_patch_idx=torch.arange(num_patches, device=tokens.device).expand(batch, -1),
                        kept_valid=torch.ones(batch, h * w, dtype=torch.bool, device=tokens.device))
            return tokens, idx, info

        kept_patch_idx = torch.topk(patch_logits.detach(), n_keep, dim=1).indices.sort(dim=1).values
        kept_idx, kept_valid = patch_token_index(kept_patch_idx, (h, w), self.patch_size)
        kept = gather_rows(tokens, kept_idx)                                 # [B, n_keep * k^2, C]
        if self.straight_through_gate and torch.is_grad_enabled():  # value-neutral: skipped at inference
            s = torch.gather(patch_logits, 1, kept_patch_idx).sigmoid()
            gate = (s - s.detach()).repeat_interleave(self.patch_size ** 2, dim=1).unsqueeze(-1)
            kept = kept + kept * gate.to(kept.dtype)            # == kept in value, gradient reaches s
        info.update(keep_ratio=float(ratio), pruned=True, num_kept_patches=n_keep,
                    num_kept_tokens=kept_valid.sum(1).float().mean(), kept_patch_idx=kept_patch_idx,
                    kept_valid=kept_valid)
        return kept, kept_idx, info

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, patch_size={self.patch_size}, keep_ratio={self.keep_ratio}, "
                f"min_patches={self.min_patches}, warmup={self.token_pruning_warmup_epochs}, "
                f"prune_in_eval={self.prune_in_eval}, straight_through_gate={self.straight_through_gate}")


def _check(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ValueError(f"PatchLevelPruner: dset.{key} = {value!r} is invalid: must be {rule}")


# The seeds' names (the fork's promised API), as aliases of the functions the training loss calls
# (cass.cass_loss dispatches to these; signatures and shapes in cass_losses.py / cass_targets.py):
compute_cass_loss_object_normalized = cass.cass_loss_object  # 'object': (logits [B, P], boxes, feat, img, k, cfg)
compute_patch_area_weight = cass.patch_area_weight           # a_p [B, P] of 'area_patch'
generate_soft_target_mask = cass.generate_soft_target_mask   # Y [B, P], the merged soft target
