"""DSET loss terms and diagnostics: pure functions of one forward pass's output dict.

The DSET model leaves in its output dict what these need (``RTDETR.forward``):
- ``dset_prune_info``: one info dict per pruned encoder level (from PatchLevelPruner);
- ``dset_moe_encoder`` / ``dset_moe_decoder``: one dict per mixture-of-experts layer of that part
  (``name`` local to the part, ``balance_loss`` scalar with graph, ``expert_fraction`` [E], ``router_prob`` [E]);
- ``input_shape``: (H, W) of the padded input batch (the pixel frame of the targets and of CASS).

CASS over two pruned levels is computed per level and averaged (each level's loss already has the
normalisation chosen by ``dset.cass_normalization``). The weights are applied by ``DSETCriterion``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

from src.zoo.rtdetr import cass
from src.misc.transfer import tensor_on
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy

MOE_PARTS = ("encoder", "decoder")


def targets_to_abs_xyxy(targets: List[dict], img_shape) -> List[Tensor]:
    """Normalised cxcywh target boxes (relative to the padded batch) -> absolute x1y1x2y2 pixels.

    img_shape: (H, W) of the padded input tensor. Returns a list of [N_b, 4] tensors.
    """
    h, w = img_shape
    if not targets:
        return []
    boxes = targets[0]["boxes"]
    scale = tensor_on([w, h, w, h], boxes.device, boxes.dtype)  # once, without a blocking copy (new_tensor is one)
    return [box_cxcywh_to_xyxy(t["boxes"]) * scale for t in targets]


def compute_cass(prune_infos: List[dict], gt_xyxy: List[Tensor], img_shape, patch_size: int,
                 level_configs: Sequence[cass.CASSConfig]) -> Tensor:
    """Mean over pruned levels of the CASS loss on each level's patch logits (unweighted), each level with
    its own CASSConfig (``CASSSettings.level_configs``)."""
    return cass.cass_loss_levels([info["patch_importance_scores"] for info in prune_infos], gt_xyxy,
                                 [info["feat_shape"] for info in prune_infos], img_shape, patch_size,
                                 list(level_configs))


def moe_balance_losses(outputs: dict) -> Dict[str, Tensor]:
    """Mean Switch balance loss over the MoE layers of each part ({'encoder': scalar, 'decoder': scalar};
    parts without experts, or on the export path without statistics, are omitted)."""
    out = {}
    for part in MOE_PARTS:
        layers = outputs.get(f"dset_moe_{part}") or []
        if layers:
            out[part] = torch.stack([layer["balance_loss"] for layer in layers]).mean()
    return out


def expert_usage(outputs: dict) -> Dict[str, Tensor]:
    """Fraction of routed assignments per expert, per MoE layer, keyed ``{part}.{layer name}/expert{e}``
    (e.g. ``decoder.decoder.layers.0.moe/expert0``, the module's path in the detector) for TensorBoard."""
    out = {}
    for part in MOE_PARTS:
        for layer in outputs.get(f"dset_moe_{part}") or []:
            frac = layer["expert_fraction"].detach()
            for e in range(frac.numel()):
                out[f"{part}.{layer['name']}/expert{e}"] = frac[e]
    return out


@torch.no_grad()
def cass_diagnostics(outputs: dict, targets: List[dict], patch_size: int,
                     level_configs: Sequence[cass.CASSConfig]) -> Dict[str, Tensor]:
    """CASS spatial statistics averaged over pruned levels: ``cass/top_left_loss`` etc."""
    infos = outputs.get("dset_prune_info") or []
    if not infos:
        return {}
    img_shape = outputs["input_shape"]
    gt = targets_to_abs_xyxy(targets, img_shape)
    acc: Dict[str, List[Tensor]] = {}
    for cfg, info in zip(level_configs, infos):
        stats = cass.cass_spatial_stats(info["patch_importance_scores"].detach(), gt, info["feat_shape"],
                                        img_shape, patch_size, cfg)
        for k, v in stats.items():
            if not k.endswith("_count"):
                acc.setdefault(k, []).append(v)
    return {f"cass/{k}": torch.stack(v).mean() for k, v in acc.items()}
