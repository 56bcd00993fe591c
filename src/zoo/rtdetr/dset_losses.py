"""DSET auxiliary losses and diagnostics computed from one forward pass.

The model leaves two things behind after a forward pass:
- ``outputs['dset_prune_info']``: one info dict per pruned encoder level (from PatchLevelPruner);
- ``MoEFFN.last_aux`` on every mixture-of-experts layer (balance loss, expert usage).

CASS over two pruned levels is computed per level and averaged (each level's loss already has the
normalisation chosen by ``dset.cass_normalization``).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from src.zoo.rtdetr import cass
from src.zoo.rtdetr.box_ops import box_cxcywh_to_xyxy
from src.zoo.rtdetr.dset_config import level_normalizations
from src.zoo.rtdetr.moe import MoEFFN


def targets_to_abs_xyxy(targets: List[dict], img_shape) -> List[Tensor]:
    """Normalised cxcywh target boxes (relative to the padded batch) -> absolute x1y1x2y2 pixels.

    img_shape: (H, W) of the padded input tensor. Returns a list of [N_b, 4] tensors.
    """
    h, w = img_shape
    return [box_cxcywh_to_xyxy(t["boxes"]) * t["boxes"].new_tensor([w, h, w, h]) for t in targets]


def cass_weight(dset: dict, epoch: int) -> float:
    """``cass_loss_weight * min(1, epoch / cass_warmup_epochs)`` (full weight when warmup is 0)."""
    warm = dset["cass_warmup_epochs"]
    factor = 1.0 if warm == 0 else min(1.0, epoch / warm)
    return dset["cass_loss_weight"] * factor


def cass_config_from_dset(dset: dict, normalization: str | None = None) -> cass.CASSConfig:
    """The CASSConfig of the dset settings; `normalization` gives the mode of one level (needed when
    `dset.cass_normalization` is a per-level list; the soft target itself does not depend on the mode)."""
    mode = dset["cass_normalization"] if normalization is None else normalization
    if not isinstance(mode, str):
        raise ValueError(f"cass_config_from_dset: dset.cass_normalization = {mode!r} is per level; pass the "
                         f"level's mode (cass_level_configs)")
    return cass.CASSConfig(
        expansion_ratio=float(dset["cass_expansion_ratio"]), min_size=float(dset["cass_min_size"]),
        decay_type=dset["cass_decay_type"], use_subpixel_offset=dset["use_subpixel_offset"],
        loss_type=dset["cass_loss_type"], focal_alpha=float(dset["cass_focal_alpha"]),
        focal_beta=float(dset["cass_focal_beta"]), normalization=mode,
        bg_weight=float(dset["cass_bg_weight"]), spatial_reg=float(dset["cass_spatial_reg"]))


def cass_level_configs(dset: dict, num_levels: int) -> List[cass.CASSConfig]:
    """One CASSConfig per pruned level (`dset.cass_normalization`: one mode for all, or one per level)."""
    return [cass_config_from_dset(dset, mode)
            for mode in level_normalizations(dset["cass_normalization"], num_levels)]


def compute_cass(prune_infos: List[dict], gt_xyxy: List[Tensor], img_shape, dset: dict) -> Tensor:
    """Mean over pruned levels of the CASS loss on each level's patch logits (unweighted), each level with
    its own normalisation."""
    return cass.cass_loss_levels([info["patch_importance_scores"] for info in prune_infos], gt_xyxy,
                                 [info["feat_shape"] for info in prune_infos], img_shape, dset["patch_size"],
                                 cass_level_configs(dset, len(prune_infos)))


def moe_balance_losses(model: nn.Module) -> Dict[str, Tensor]:
    """Mean Switch balance loss of the encoder's and the decoder's MoE layers (absent parts omitted)."""
    parts: Dict[str, List[Tensor]] = {"encoder": [], "decoder": []}
    for name, module in model.named_modules():
        if isinstance(module, MoEFFN) and getattr(module, "last_aux", None) is not None:
            part = "encoder" if name.startswith("encoder.") else "decoder"
            parts[part].append(module.last_aux["balance_loss"])
    return {k: torch.stack(v).mean() for k, v in parts.items() if v}


def expert_usage(model: nn.Module) -> Dict[str, Tensor]:
    """Fraction of routed assignments per expert, per MoE layer (for TensorBoard)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEFFN) and getattr(module, "last_aux", None) is not None:
            frac = module.last_aux["expert_fraction"].detach()
            for e in range(frac.numel()):
                out[f"{name}/expert{e}"] = frac[e]
    return out


def dset_losses(outputs: dict, targets: List[dict], img_shape, dset: dict, epoch: int,
                model: nn.Module) -> Dict[str, Tensor]:
    """Weighted DSET loss terms to add to the detection losses.

    Keys: ``loss_cass`` (when use_cass and levels are pruned), ``loss_moe_balance_encoder``,
    ``loss_moe_balance_decoder`` (when the parts have experts).
    """
    losses: Dict[str, Tensor] = {}
    infos = outputs.get("dset_prune_info") or []
    if dset["use_cass"] and infos:
        gt = targets_to_abs_xyxy(targets, img_shape)
        losses["loss_cass"] = cass_weight(dset, epoch) * compute_cass(infos, gt, img_shape, dset)
    balance = moe_balance_losses(model)
    if "encoder" in balance:
        losses["loss_moe_balance_encoder"] = dset["encoder_moe_balance_weight"] * balance["encoder"]
    if "decoder" in balance:
        losses["loss_moe_balance_decoder"] = dset["moe_balance_weight"] * balance["decoder"]
    return losses


@torch.no_grad()
def cass_diagnostics(outputs: dict, targets: List[dict], img_shape, dset: dict) -> Dict[str, Tensor]:
    """CASS spatial statistics averaged over pruned levels: ``cass/top_left_loss`` etc."""
    infos = outputs.get("dset_prune_info") or []
    if not infos:
        return {}
    gt = targets_to_abs_xyxy(targets, img_shape)
    acc: Dict[str, List[Tensor]] = {}
    for cfg, info in zip(cass_level_configs(dset, len(infos)), infos):
        stats = cass.cass_spatial_stats(info["patch_importance_scores"].detach(), gt, info["feat_shape"],
                                        img_shape, dset["patch_size"], cfg)
        for k, v in stats.items():
            if not k.endswith("_count"):
                acc.setdefault(k, []).append(v)
    return {f"cass/{k}": torch.stack(v).mean() for k, v in acc.items()}
