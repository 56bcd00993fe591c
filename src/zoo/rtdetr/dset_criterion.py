"""DSETCriterion: the one owner of every loss term of a DSET run.

It wraps the detection criterion (``base``, e.g. RTDETRCriterionv2, built from its own config section) and
adds the DSET terms, each with its weight in ``weight_dict`` as detr's SetCriterion does:

    loss_cass                 = weight_dict['loss_cass'] * min(1, epoch / cass_warmup_epochs) * CASS
    loss_moe_balance_encoder  = weight_dict['loss_moe_balance_encoder'] * mean over encoder MoE layers
    loss_moe_balance_decoder  = weight_dict['loss_moe_balance_decoder'] * mean over decoder MoE layers

(weights from ``dset.cass_loss_weight``, ``dset.encoder_moe_balance_weight``, ``dset.moe_balance_weight``).
Everything comes from the model's output dict (``dset_losses`` names the keys); nothing is read off modules.
CASS with weight 0 (or inside its warmup) is still computed, so its zero gradient reaches the pruner in
every step (what DDP needs, see DSETHook.unused_parameter_reasons).

YAML (configs/include/dset.yaml)::

    criterion: DSETCriterion
    DSETCriterion: {base: RTDETRCriterionv2}
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import Tensor, nn

from src.core.registry import register
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.dset_config import DSETConfig


@register()
class DSETCriterion(nn.Module):
    """forward(outputs, targets, epoch=None) -> the base criterion's weighted terms plus ``loss_cass`` (when
    ``dset.use_cass``; every pruned level gives its info, also inside the pruning warmup) and ``loss_moe_balance_{encoder,decoder}`` (when that part has
    experts). ``epoch`` drives the CASS warmup (None: full weight)."""

    __inject__ = ["base"]
    __sections__ = ["dset"]

    def __init__(self, base: nn.Module, dset: Optional[DSETConfig]):
        super().__init__()
        self.base = base
        self.dset = dset  # None (dset.enabled: false): the base criterion's terms only, as for the plain detector
        base_weights = dict(getattr(base, "weight_dict", {}) or {})
        extra: Dict[str, float] = {}
        if dset is not None:
            if dset.cass.enabled:
                extra["loss_cass"] = float(dset.cass.loss_weight)
            if dset.moe.encoder_num_experts > 0:
                extra["loss_moe_balance_encoder"] = float(dset.moe.encoder_balance_weight)
            if dset.moe.num_experts > 0:
                extra["loss_moe_balance_decoder"] = float(dset.moe.balance_weight)
        clash = sorted(set(base_weights) & set(extra))
        if clash:
            raise ValueError(f"DSETCriterion: the base criterion already has weights for {clash}")
        self.weight_dict = {**base_weights, **extra}

    def forward(self, outputs: dict, targets: List[dict], epoch: Optional[int] = None, **kwargs) -> Dict[str, Tensor]:
        losses = self.base(outputs, targets, epoch=epoch, **kwargs)
        losses.update(self.dset_terms(outputs, targets, epoch))
        return losses

    def dset_terms(self, outputs: dict, targets: List[dict], epoch: Optional[int]) -> Dict[str, Tensor]:
        terms: Dict[str, Tensor] = {}
        if self.dset is None:
            return terms
        infos = outputs.get("dset_prune_info") or []
        settings = self.dset.cass
        if settings.enabled and not infos:
            raise KeyError("DSETCriterion: dset.use_cass is on but the model's outputs have no dset_prune_info; "
                           "build the model as DSETRTDETR with encoder DSETHybridEncoder (configs/include/dset.yaml)")
        if settings.enabled:
            img_shape = outputs["input_shape"]
            gt = dl.targets_to_abs_xyxy(targets, img_shape)
            raw = dl.compute_cass(infos, gt, img_shape, self.dset.pruner.patch_size,
                                  settings.level_configs(len(infos)))
            terms["loss_cass"] = (self.weight_dict["loss_cass"] * settings.ramp(epoch)) * raw
        for part, mean in dl.moe_balance_losses(outputs).items():
            key = f"loss_moe_balance_{part}"
            if key not in self.weight_dict:
                raise KeyError(f"DSETCriterion: the model's {part} has MoE layers but dset sets no {part} experts "
                               f"(weight_dict has no {key}); build model and criterion from the same config")
            terms[key] = self.weight_dict[key] * mean
        return terms
