"""One optimisation step of the trainer and its non-finite handling.

``train_step(state, criterion, images, targets, settings, logger, epoch, i, buffers)`` (state: the run's
TrainState, src/solver/state.py; settings: StepSettings) runs forward (under autocast in ``amp_dtype`` when AMP is
on, on CUDA and CPU alike), the loss (the criterion's terms, in float32), the scaled backward,
unscale, clipping, and ONE all-reduce of two flags that tells every rank whether the step is bad and whether
the float16 GradScaler overflowed; then one of three branches, the same on every rank, so none waits in a
collective the others skip:

* applied: optimizer step through the scaler, EMA update;
* AMP overflow (scaled gradients not finite, float16 only): the scaler skips the update and lowers its
  scale, as GradScaler intends; counted in ``state.amp_overflow_steps``; the EMA is not updated and the
  (non-finite) gradient norm is not reported;
* non-finite loss or (without a scaler) gradient: ``handle_nonfinite`` counts it, restores the buffers, or
  raises NonFiniteLossError once the allowed skips are used up.

Non-finite model OUTPUTS (pred_logits / pred_boxes of any layer, aux, encoder, denoising, DSET scores) are
caught earlier, right after the forward pass and before the criterion, whose matcher cannot match NaN
boxes: a first all-reduced flag makes every rank skip the loss and the backward together (the same
counting and stopping), so no rank raises alone while the others wait in the criterion's or DDP's
all-reduce.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional

import torch

from src.misc import dist
from src.solver.state import TrainState


def amp_dtype_for(cfg, device: torch.device, use_amp: bool) -> torch.dtype:
    """The autocast dtype of AMP: the config's ``amp_dtype`` (validated: float16 | bfloat16) when set, else
    float16 on CUDA and bfloat16 on CPU. float16 autocast on CPU is a trap (measured on the 2-core CPU,
    512x288 batch 4: about 245 s a step against 4.5 s in float32 and 5.0 s in bfloat16), so an explicit
    float16 with AMP on CPU is allowed (tests use it for the GradScaler) but warned about."""
    name = cfg.get("amp_dtype")
    if name is None:
        name = "bfloat16" if device.type == "cpu" else "float16"
    elif name == "float16" and use_amp and device.type == "cpu" and dist.is_main_process():
        print("warning: use_amp with amp_dtype float16 on CPU: float16 autocast is about 50x slower than float32 "
              "there; use amp_dtype: bfloat16 (or use_amp: false, float32 is the fast CPU dtype)")
    return getattr(torch, name)


def eval_amp_for(eval_amp, use_amp: bool, amp_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether evaluation runs under autocast: ``eval_amp`` (validated true / false / null); null follows
    ``use_amp``, except float16 on CPU (about 50x slower than float32 there: evaluation stays float32)."""
    cpu_fp16 = device.type == "cpu" and amp_dtype == torch.float16
    if eval_amp is None:
        return use_amp and not cpu_fp16
    if eval_amp and cpu_fp16 and dist.is_main_process():
        print("warning: eval_amp with amp_dtype float16 on CPU: float16 autocast is about 50x slower than float32 "
              "there; evaluation would be too (eval_amp: null evaluates in float32)")
    return bool(eval_amp)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term (or the gradient norm) is NaN/inf and no more skips are allowed."""


class StepSettings(NamedTuple):
    """What a step needs besides the state: autocast, clipping, the skip allowance, where checkpoints go."""
    device_type: str
    amp_dtype: torch.dtype
    use_amp: bool
    clip: float           # gradient clipping max norm; <= 0: no clipping (the norm is still reported)
    max_skips: int        # non-finite steps that may be skipped before the run stops
    output_dir: str       # named in the stop message (its last.pth)
    is_main: bool


class StepResult(NamedTuple):
    outputs: dict
    losses: Dict[str, torch.Tensor]
    total: torch.Tensor
    grad_norm: torch.Tensor | None  # None when the step overflowed under AMP (the norm is inf/NaN)
    overflow: bool = False


def skip_buffers(model, max_skips: int) -> List[torch.Tensor]:
    """Buffers a skipped step must restore (what its forward pass changed: BatchNorm running statistics);
    only needed when skips are allowed (small: a few thousand numbers for R18)."""
    if max_skips <= 0:
        return []
    return [b for b in dist.unwrap_model(model).buffers() if b.is_floating_point() or b.dtype == torch.long]


def named_float_tensors(obj, prefix: str = ""):
    """(name, tensor) of every floating-point tensor in a nested output dict / list, e.g.
    ``aux_outputs.2.pred_boxes``, in a fixed order (the same on every rank for the same model)."""
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_float_tensors(v, f"{prefix}.{i}")


def nonfinite_outputs(outputs: dict) -> tuple:
    """(names, flags): the output tensors' names and a bool tensor [N], True where one holds NaN/inf."""
    named = list(named_float_tensors(outputs))
    if not named:
        return [], torch.zeros(0, dtype=torch.bool)
    flags = torch.stack([~torch.isfinite(t.detach()).all() for _, t in named])
    return [n for n, _ in named], flags


def train_step(state: TrainState, criterion, images, targets, settings: StepSettings, logger, epoch: int, i: int,
               buffers: List[torch.Tensor]) -> Optional[StepResult]:
    """One step on every rank; returns None when the step was skipped (every rank skips together)."""
    model, scaler = state.model, state.scaler
    saved_buffers = [b.clone() for b in buffers]
    with torch.autocast(device_type=settings.device_type, dtype=settings.amp_dtype, enabled=settings.use_amp):
        outputs = model(images, targets)
    names, out_bad = nonfinite_outputs(outputs)
    if dist.all_reduce_sum(out_bad.any().float()) > 0:  # before the matcher, on every rank together
        bad = [f"model output {n}" for n, b in zip(names, out_bad.tolist()) if b]
        _skip(state, settings, logger, bad, epoch, i, buffers, saved_buffers, unscaled=False)
        return None
    with torch.autocast(device_type=settings.device_type, enabled=False):
        losses = criterion(outputs, targets, epoch=epoch)  # every term and its weight: the criterion's
    total = sum(losses.values())

    state.optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # every rank runs backward, so DDP's gradient all-reduce matches
    scaler.unscale_(state.optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, settings.clip) if settings.clip > 0
                 else torch.nn.utils.get_total_norm([p.grad for p in params]))
    # one all-reduce for all ranks (one sync per step): every rank skips or stops together instead of hanging.
    # With a GradScaler (float16) an inf gradient is the scaler's business: it skips the step, lowers the scale.
    grad_bad = ~torch.isfinite(grad_norm)
    scaled = scaler.is_enabled()
    bad = ~torch.isfinite(total.detach()) | (grad_bad & (not scaled))
    n_bad, n_overflow = dist.all_reduce_sum(torch.stack([bad, grad_bad & scaled]).float()).tolist()
    if n_bad > 0:
        _skip(state, settings, logger, nonfinite_loss_terms(losses, total, grad_norm, scaled), epoch, i, buffers,
              saved_buffers, unscaled=True)
        return None

    scaler.step(state.optimizer)  # skips optimizer.step when the scaled gradients overflowed
    scaler.update()
    overflow = n_overflow > 0
    if overflow:
        state.amp_overflow_steps += 1
    elif state.ema:
        state.ema.update(model)
    state.lr_scheduler.step()
    state.step += 1
    return StepResult(outputs, losses, total, None if overflow else grad_norm, overflow)


def _skip(state: TrainState, settings: StepSettings, logger, local_bad: List[str], epoch, i, buffers, saved_buffers,
          unscaled: bool):
    """Skip a bad step on every rank: count it (or stop), undo its buffer changes, keep the schedule going."""
    handle_nonfinite(state, settings, logger, local_bad, epoch, i)
    with torch.no_grad():
        for b, saved in zip(buffers, saved_buffers):
            b.copy_(saved)
    state.optimizer.zero_grad(set_to_none=True)
    if unscaled:
        state.scaler.update()  # closes the unscale_ of the step; lowers the AMP scale
    state.lr_scheduler.step()  # the schedule follows iterations, skipped or not
    state.step += 1


def nonfinite_loss_terms(losses, total, grad_norm, scaled: bool) -> List[str]:
    """What was not finite on this rank: the loss terms, else their sum, else (without a scaler) the norm."""
    local = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v).all()]
    if not local and not torch.isfinite(total):
        local = [f"the sum of the loss terms={float(total.detach())} (every term finite)"]
    if not local and not scaled and not torch.isfinite(grad_norm):
        local = [f"gradient norm={float(grad_norm)} (loss terms finite: the backward pass produced NaN/inf)"]
    return local


def handle_nonfinite(state: TrainState, settings: StepSettings, logger, local_bad: List[str], epoch, i):
    """Count a non-finite step; raise NonFiniteLossError naming what was bad once the skips are used up.

    Called on every rank together (the flag is all-reduced); what each rank found is gathered so that
    every rank's message names it (with the rank under DDP)."""
    per_rank = dist.all_gather_object(local_bad)
    bad = [f"{term} (rank {r})" if len(per_rank) > 1 else term for r, terms in enumerate(per_rank) for term in terms]
    what = "model output" if any(t.startswith("model output") for t in bad) else "loss"
    state.nonfinite_skipped += 1
    logger.scalars({"train/nonfinite_skipped": state.nonfinite_skipped}, state.step)
    where = f"step {state.step} (epoch {epoch}, iteration {i})"
    max_skips = settings.max_skips
    if state.nonfinite_skipped > max_skips:
        last = os.path.join(settings.output_dir, "last.pth")
        if state.last_saved_epoch is not None:
            keep = (f"The last good checkpoint is {last} (end of epoch {state.last_saved_epoch}), left untouched: "
                    f"fix the cause and resume with -r {last}.")
        else:
            keep = "No checkpoint was written yet (this is the first epoch of the run)."
        used = f" ({max_skips} skipped step(s) allowed and used)" if max_skips else ""
        raise NonFiniteLossError(
            f"non-finite {what} at {where}: {', '.join(bad)}{used}. {keep} Lower the learning rate, check the data "
            f"and the loss weights, or allow skipping bad steps with skip_nonfinite_steps: N")
    if settings.is_main:
        print(f"[warn] skipped the step at {where}: non-finite {', '.join(bad)} "
              f"({state.nonfinite_skipped}/{max_skips} skips used)", flush=True)
