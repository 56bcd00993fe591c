"""One optimisation step of the trainer and its non-finite handling.

``train_step(trainer, images, targets, epoch, i)`` runs forward (under autocast when AMP is on), the loss
(criterion + the hooks' extra losses, in float32), the scaled backward, unscale, clipping, and ONE
all-reduced flag that tells every rank whether the step is bad; then either the optimizer / scaler / EMA
step, or the skip (``handle_nonfinite``: counted, buffers restored, or NonFiniteLossError once the allowed
skips are used up). Every rank takes the same branch, so none waits in a collective the others skip.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple

import torch

from src.misc import dist


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term (or the gradient norm) is NaN/inf and no more skips are allowed."""


class StepResult(NamedTuple):
    outputs: dict
    losses: Dict[str, torch.Tensor]
    total: torch.Tensor
    grad_norm: torch.Tensor


def skip_buffers(model, max_skips: int) -> List[torch.Tensor]:
    """Buffers a skipped step must restore (what its forward pass changed: BatchNorm running statistics);
    only needed when skips are allowed (small: a few thousand numbers for R18)."""
    if max_skips <= 0:
        return []
    return [b for b in dist.unwrap_model(model).buffers() if b.is_floating_point() or b.dtype == torch.long]


def loss_dict(tr, outputs, targets, images, epoch) -> Dict[str, torch.Tensor]:
    losses = tr.criterion(outputs, targets, epoch=epoch)
    for hook in tr.hooks:
        losses.update(hook.extra_losses(outputs, targets, images, epoch, dist.unwrap_model(tr.model)))
    return losses


def train_step(tr, images, targets, epoch: int, i: int, buffers: List[torch.Tensor], clip: float,
               max_skips: int) -> StepResult | None:
    """One step on every rank; returns None when the step was skipped (every rank skips together)."""
    model = tr.model
    saved_buffers = [b.clone() for b in buffers]
    with torch.autocast(device_type=tr.device.type, enabled=tr.use_amp):
        outputs = model(images, targets)
    with torch.autocast(device_type=tr.device.type, enabled=False):
        losses = loss_dict(tr, outputs, targets, images, epoch)
    total = sum(losses.values())

    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(total).backward()  # every rank runs backward, so DDP's gradient all-reduce matches
    tr.scaler.unscale_(tr.optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
                 else torch.nn.utils.get_total_norm([p.grad for p in params]))
    # one flag for all ranks (one sync per step): every rank skips or stops together instead of hanging.
    # Under AMP an inf gradient is the GradScaler's business (it skips the step and lowers the scale).
    bad = ~torch.isfinite(total.detach())
    if not tr.use_amp:
        bad = bad | ~torch.isfinite(grad_norm)
    if dist.all_reduce_sum(bad.float()) > 0:
        handle_nonfinite(tr, losses, total, grad_norm, epoch, i, max_skips)
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scaler.update()  # closes the unscale_ above; lowers the AMP scale
        tr.lr_scheduler.step()  # the schedule follows iterations, skipped or not
        tr.global_step += 1
        return None

    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    if tr.ema:
        tr.ema.update(model)
    tr.lr_scheduler.step()
    tr.global_step += 1
    return StepResult(outputs, losses, total, grad_norm)


def handle_nonfinite(tr, losses, total, grad_norm, epoch, i, max_skips):
    """Count a non-finite step; raise NonFiniteLossError naming the terms once the skips are used up.

    Called on every rank together (the flag is all-reduced); the offending terms are gathered so that
    every rank's message names them."""
    local = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v).all()]
    if not local and not torch.isfinite(total):
        local = [f"the sum of the loss terms={float(total.detach())} (every term finite)"]
    if not local and not tr.use_amp and not torch.isfinite(grad_norm):
        local = [f"gradient norm={float(grad_norm)} (loss terms finite: the backward pass produced NaN/inf)"]
    per_rank = dist.all_gather_object(local)
    bad = [f"{term} (rank {r})" if len(per_rank) > 1 else term for r, terms in enumerate(per_rank) for term in terms]
    tr.nonfinite_skipped += 1
    tr.logger.scalars({"train/nonfinite_skipped": tr.nonfinite_skipped}, tr.global_step)
    where = f"step {tr.global_step} (epoch {epoch}, iteration {i})"
    if tr.nonfinite_skipped > max_skips:
        last = os.path.join(tr.output_dir, "last.pth")
        if tr.last_saved_epoch is not None:
            keep = (f"The last good checkpoint is {last} (end of epoch {tr.last_saved_epoch}), left untouched: "
                    f"fix the cause and resume with -r {last}.")
        else:
            keep = "No checkpoint was written yet (this is the first epoch of the run)."
        used = f" ({max_skips} skipped step(s) allowed and used)" if max_skips else ""
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {', '.join(bad)}{used}. {keep} Lower the learning rate, check the data "
            f"and the loss weights, or allow skipping bad steps with skip_nonfinite_steps: N")
    if tr.is_main:
        print(f"[warn] skipped the step at {where}: non-finite {', '.join(bad)} "
              f"({tr.nonfinite_skipped}/{max_skips} skips used)", flush=True)
