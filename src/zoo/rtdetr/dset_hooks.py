"""What DSET adds to the training loop, as a training hook (src/core/hooks.py): its TensorBoard scalars (``dset/*``, ``cass/*``, ``moe/*``), the CASS mask pictures
(``cass/mask_level{L}``) and the keep-bias evaluation (``dset_bias`` in the eval stats, ``eval_bias/*``).

It adds no loss: every loss term (CASS, MoE balance) is owned by ``DSETCriterion``. Everything is read from
the model's output dict (``dset_losses`` names its keys). Registered when this module is imported (it is
imported by the package, src/zoo/rtdetr/__init__.py); the trainer never names DSET.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from src.core.hooks import TrainHook, register_hooks
from src.misc.visualize import figure_to_array, mask_panels_figure, patch_map_to_image, patch_rects
from src.zoo.rtdetr import cass
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.dset_config import DSETConfig

BIAS_GROUPS = ("small", "medium", "large", "far", "near")
EVAL_KEEP_SUM, EVAL_IMAGES = "applied_keep_ratio_sum", "applied_keep_ratio_images"  # eval sums of the keep ratio


@torch.no_grad()
def cass_mask_figure(image: Tensor, gt_xyxy: Tensor, info: dict, dset: DSETConfig, title: str = ""):
    """The CASS picture of one image: three titled panels (target mask, predicted keep probability, kept
    top-K) with a colour bar, the GT boxes on every panel and the kept patches outlined.

    image: [3, H, W] (the padded input, values in [0, 1]); gt_xyxy: [N, 4] absolute pixels of that input;
    info: one pruned level's info dict (the first image of its batch is drawn).
    Returns a uint8 numpy array [H', W', 3] (TrainLogger.image, PIL).
    """
    H, W = image.shape[-2:]
    h, w = info["feat_shape"]
    k = dset.pruner.patch_size
    grid = cass.patch_grid((h, w), k)
    patch_px = (k * H / h, k * W / w)
    # the soft target does not depend on the normalisation (one mode or a per-level list): any mode gives it
    target = cass.generate_soft_target_mask([gt_xyxy], (h, w), (H, W), k, dset.cass.target)[0]
    q = info["patch_importance_scores"][0].detach().float().sigmoid()
    kept = patch_rects(info["kept_patch_idx"][0].cpu(), grid, patch_px, (H, W))
    fig = mask_panels_figure(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), gt_xyxy.cpu(),
                             patch_map_to_image(target.cpu(), grid, patch_px, (H, W)).numpy(),
                             patch_map_to_image(q.cpu(), grid, patch_px, (H, W)).numpy(), kept,
                             title=title or f"level {tuple(info['feat_shape'])} cells, patch {k}, keep ratio "
                                            f"{float(info['keep_ratio']):.2f}")
    return figure_to_array(fig)


class DSETHook(TrainHook):
    def __init__(self, dset: DSETConfig):
        self.dset = dset

    def unused_parameter_reasons(self) -> List[str]:
        """When the pruner's scorer can get no gradient in a step (DDP then needs find_unused_parameters).

        The scorer computes every level's patch logits in every step (warmup and kept-everything levels
        included). With CASS on, the CASS loss on those logits reaches the scorer in every step (a zero
        weight during cass_warmup_epochs or a batch without boxes still back-propagates zeros, and DDP only
        asks that every parameter gets a gradient). Without CASS only the straight-through gate reaches it,
        and only in steps that prune: never during token_pruning_warmup_epochs or with keep_ratio 1 (nor
        with the gate off). Everything else of DSET (routers, stacked experts) is used in every step.
        Without CASS, a level so small that every patch is kept anyway (P <= min_patches) leaves it unused
        too: set ``find_unused_parameters: true`` for such tiny inputs.
        """
        p = self.dset.pruner
        if self.dset.cass.enabled:
            return []
        if p.straight_through_gate and p.token_pruning_warmup_epochs == 0 and p.keep_ratio < 1:
            return []
        return ["DSET token pruner without CASS: its scorer gets a gradient only through the straight-through gate "
                "in steps that prune (not during token_pruning_warmup_epochs, with keep_ratio 1 or the gate off)"]

    def step_scalars(self, outputs, targets, images, model) -> Dict[str, float]:
        out = {}
        infos = outputs.get("dset_prune_info") or []
        if infos:
            out["dset/keep_ratio"] = sum(float(x["keep_ratio"]) for x in infos) / len(infos)
            out["dset/kept_tokens"] = sum(float(x["num_kept_tokens"]) for x in infos)
            if self.dset.cass.enabled:
                out.update(dl.cass_diagnostics(outputs, targets, self.dset.pruner.patch_size,
                                               self.dset.cass.level_configs(len(infos))))
        for k, v in dl.expert_usage(outputs).items():
            out[f"moe/{k}"] = v
        return out

    def after_step(self, step, logger, outputs, targets, images):
        interval = self.dset.vis_interval
        if not (interval and step % interval == 0 and logger.enabled):
            return
        infos = outputs.get("dset_prune_info") or []
        if not infos:
            return
        gt = dl.targets_to_abs_xyxy(targets, images.shape[-2:])
        for level, info in enumerate(infos):
            img = cass_mask_figure(images[0], gt[0], info, self.dset,
                                   title=f"step {step}, pruned level {level}, keep ratio "
                                         f"{float(info['keep_ratio']):.2f}")
            logger.image(f"cass/mask_level{level}", img, step)

    def eval_batch(self, outputs, targets, images) -> Dict[str, Tensor]:
        sums: Dict[str, Tensor] = {}
        infos = outputs.get("dset_prune_info") or []
        if not infos:
            return sums
        # the keep ratio the pruners applied (1.0 for a level that kept everything), weighted by images
        applied = sum(float(x["keep_ratio"]) for x in infos) / len(infos)
        sums[EVAL_KEEP_SUM] = torch.tensor(applied * images.shape[0], dtype=torch.float64)
        sums[EVAL_IMAGES] = torch.tensor(float(images.shape[0]), dtype=torch.float64)
        img_shape = images.shape[-2:]
        gt = dl.targets_to_abs_xyxy(targets, img_shape)
        # val halves by image id parity (plain ints, no device sync): a mode chosen on half0 is reported on half1
        halves = [[i for i, t in enumerate(targets) if int(t["image_id"]) % 2 == h] for h in (0, 1)]
        p = self.dset.pruner
        for cfg, info in zip(self.dset.cass.level_configs(len(infos)), infos):
            logits = info["patch_importance_scores"]
            args = (info["feat_shape"], img_shape, p.patch_size, p.keep_ratio, cfg)
            stats = cass.keep_bias_stats(logits, gt, *args, min_patches=p.min_patches,
                                         level=cass.level_name(info["feat_shape"], img_shape))
            for h, rows in enumerate(halves):
                if rows:
                    tag = f"half{h}"
                    half = cass.keep_bias_stats(logits[rows], [gt[i] for i in rows], *args,
                                                min_patches=p.min_patches, level=tag)
                    stats.update({k: v for k, v in half.items() if k.startswith(tag + cass.LEVEL_SEP)})
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
        return sums

    def eval_metrics(self, sums) -> dict:
        """``dset_bias`` (the keep-bias figures) and ``dset_keep_ratio`` (the mean keep ratio the pruners
        applied in this evaluation: 1.0 inside the pruning warmup or with ``prune_in_eval: false``)."""
        if not sums:
            return {}
        bias = {k: v for k, v in sums.items() if k not in (EVAL_KEEP_SUM, EVAL_IMAGES)}
        return {"dset_bias": cass.finalize_keep_bias(bias),
                "dset_keep_ratio": float(sums[EVAL_KEEP_SUM]) / max(float(sums[EVAL_IMAGES]), 1.0)}

    def eval_scalars(self, stats) -> Dict[str, float]:
        # per level: eval_bias/P4/keep_recall_small next to the pooled eval_bias/keep_recall_small
        return {f"eval_bias/{cass.bias_tag(k)}": v for k, v in (stats.get("dset_bias") or {}).items()}

    def eval_report(self, stats) -> str:
        bias = stats.get("dset_bias")
        if not bias:
            return ""
        lines = ["| DSET keep-recall | " + " | ".join(BIAS_GROUPS) + " |\n|---|" + "---:|" * len(BIAS_GROUPS)]
        for prefix, name in (("keep_recall", "pruner"), ("oracle_keep_recall", "oracle (top-K of target)")):
            lines.append(f"| {name} | " + " | ".join(f"{bias[f'{prefix}_{g}']:.3f}" for g in BIAS_GROUPS) + " |")
        lines.append(f"centroid shift dx {bias['centroid_dx']:+.4f}, dy {bias['centroid_dy']:+.4f} "
                     f"(dy < 0: mask drifts up); keep ratio applied {stats.get('dset_keep_ratio', float('nan')):.2f}")
        return "\n".join(lines)


@register_hooks
def dset_hooks(cfg) -> List[TrainHook]:
    return [DSETHook(cfg.dset)] if cfg.dset is not None else []
