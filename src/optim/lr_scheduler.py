"""Per-iteration learning-rate schedule: linear warmup times a decay schedule.

One object, stepped once per optimizer step. The learning rate used for iteration ``i``
(0-based global optimizer step) of each parameter group is

    lr_g(i) = base_lr_g * warmup(i) * decay(i)

    warmup(i) = min(1, (i + 1) / warmup_iters)          (1 when warmup_iters == 0)
    decay(i)  = gamma ** #{m in milestones : m <= i}                       'multistep'
              = r + (1 - r) * 0.5 * (1 + cos(pi * min(i, T) / T)), r = min_lr_ratio  'cosine'
              = 1                                                           'constant'

``warmup`` follows the official RT-DETR ``LinearWarmup`` (the first step uses base_lr /
warmup_iters, step ``warmup_iters - 1`` reaches base_lr); ``decay`` runs on the global
iteration count from 0 (the cosine spans the whole run T = total_iters, warmup included).
With the official configs (MultiStepLR stepped per epoch, LinearWarmup per iteration) this
gives the same learning rates, as an epoch-``e`` milestone becomes iteration
``e * iters_per_epoch``.

Usage::

    sched = build_lr_scheduler(optimizer, cfg.get('lr_scheduler'), cfg.get('lr_warmup_scheduler'),
                               iters_per_epoch=len(loader), epochs=cfg['epoches'])
    for batch in loader:
        ... optimizer.step(); sched.step()

The constructor sets the learning rates of iteration 0. Base learning rates are stored in
each group's ``'initial_lr'`` (as torch schedulers do), so a scheduler rebuilt after
``optimizer.load_state_dict`` still knows them.
"""
from __future__ import annotations

import bisect
import math
from typing import List, Optional, Sequence

import torch

__all__ = ["WarmupScheduler", "build_lr_scheduler", "SCHEDULE_TYPES"]

SCHEDULES = ("multistep", "cosine", "constant")


class WarmupScheduler:
    """Linear warmup followed by a multistep / cosine / constant decay, per iteration.

    Args:
        optimizer: its groups' current ``lr`` (or ``initial_lr``) are the base learning rates.
        warmup_iters: number of warmup iterations (0 = none).
        schedule: 'multistep' | 'cosine' | 'constant'.
        total_iters: length of the run in iterations (the cosine period; must be > 0 for cosine).
        milestones: iterations at which the lr is multiplied by ``gamma`` ('multistep').
        gamma: multistep decay factor.
        min_lr_ratio: final lr / base lr of the cosine schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int, schedule: str,
                 total_iters: int, milestones: Sequence[int] = (), gamma: float = 0.1,
                 min_lr_ratio: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"WarmupScheduler: schedule {schedule!r} unknown; valid: {SCHEDULES}")
        if warmup_iters < 0:
            raise ValueError(f"WarmupScheduler: warmup_iters must be >= 0, got {warmup_iters}")
        if schedule == "cosine" and total_iters <= 0:
            raise ValueError(f"WarmupScheduler: cosine needs total_iters > 0, got {total_iters}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"WarmupScheduler: milestones must be increasing, got {list(milestones)}")
        self.optimizer = optimizer
        self.warmup_iters = int(warmup_iters)
        self.schedule = schedule
        self.total_iters = int(total_iters)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.min_lr_ratio = float(min_lr_ratio)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs: List[float] = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_iter = 0
        self._apply()

    def warmup_factor(self, it: int) -> float:
        if self.warmup_iters == 0:
            return 1.0
        return min(1.0, (it + 1) / self.warmup_iters)

    def decay_factor(self, it: int) -> float:
        if self.schedule == "multistep":
            return self.gamma ** bisect.bisect_right(self.milestones, it)
        if self.schedule == "cosine":
            t = min(it, self.total_iters) / self.total_iters
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    def lr_at(self, it: int) -> List[float]:
        """Learning rate of every group at iteration ``it`` (pure; does not change state)."""
        f = self.warmup_factor(it) * self.decay_factor(it)
        return [b * f for b in self.base_lrs]

    def _apply(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.lr_at(self.last_iter)):
            g["lr"] = lr

    def step(self) -> None:
        """Advance to the next iteration (call after ``optimizer.step()``)."""
        self.last_iter += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Progress only; the schedule's shape comes from the constructor (config), so a resumed
        run with an edited schedule follows the new config from the saved iteration."""
        return {"last_iter": self.last_iter, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"WarmupScheduler.load_state_dict: checkpoint has "
                             f"{len(state['base_lrs'])} parameter groups, the optimizer has "
                             f"{len(self.optimizer.param_groups)}; the optimizer config changed")
        self.last_iter = int(state["last_iter"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        for g, b in zip(self.optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = b
        self._apply()

    def __repr__(self) -> str:
        return (f"WarmupScheduler(warmup_iters={self.warmup_iters}, schedule={self.schedule!r}, "
                f"total_iters={self.total_iters}, milestones={self.milestones}, gamma={self.gamma}, "
                f"min_lr_ratio={self.min_lr_ratio}, last_iter={self.last_iter})")


# Config 'type' -> (kind, accepted keys besides 'type').
SCHEDULE_TYPES = {
    "MultiStepLR": ("multistep", ("milestones", "gamma")),
    "CosineLR": ("cosine", ("min_lr_ratio",)),
    "ConstantLR": ("constant", ()),
}
WARMUP_TYPES = {"LinearWarmup": ("linear", ("warmup_duration",))}


def _split(cfg: dict, types: dict, where: str):
    cfg = dict(cfg)
    t = cfg.pop("type", None)
    if t not in types:
        raise KeyError(f"{where}.type: unknown type {t!r}; valid: {', '.join(types)}")
    valid = types[t][1]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown} for {t}; valid keys: {', '.join(valid) or '(none)'}")
    return t, cfg


def build_lr_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Optional[dict],
                       warmup_cfg: Optional[dict], iters_per_epoch: int, epochs: int,
                       where: str = "config") -> WarmupScheduler:
    """Build a ``WarmupScheduler`` from the RT-DETR config sections.

    Args:
        sched_cfg: ``lr_scheduler`` section or None (constant). Types:
            ``{type: MultiStepLR, milestones: [EPOCHS...], gamma: 0.1}`` - milestones are in
            EPOCHS and converted to iterations (``m * iters_per_epoch``);
            ``{type: CosineLR, min_lr_ratio: 0.0}`` - cosine over ``epochs * iters_per_epoch``;
            ``{type: ConstantLR}``.
        warmup_cfg: ``lr_warmup_scheduler`` section or None (no warmup):
            ``{type: LinearWarmup, warmup_duration: ITERATIONS}`` (iterations, as in RT-DETR).
        iters_per_epoch: optimizer steps per epoch (len(train_loader)).
        epochs: number of training epochs.
    Unknown types or keys raise KeyError naming the key and the valid ones.
    """
    if iters_per_epoch <= 0:
        raise ValueError(f"build_lr_scheduler: iters_per_epoch must be > 0, got {iters_per_epoch}")
    total_iters = int(epochs) * int(iters_per_epoch)
    warmup_iters = 0
    if warmup_cfg is not None:
        _, w = _split(warmup_cfg, WARMUP_TYPES, f"{where}.lr_warmup_scheduler")
        warmup_iters = int(w.get("warmup_duration", 0))
    if sched_cfg is None:
        return WarmupScheduler(optimizer, warmup_iters, "constant", total_iters)
    t, s = _split(sched_cfg, SCHEDULE_TYPES, f"{where}.lr_scheduler")
    schedule = SCHEDULE_TYPES[t][0]
    if schedule == "multistep":
        if "milestones" not in s:
            raise KeyError(f"{where}.lr_scheduler: MultiStepLR needs 'milestones' (in epochs)")
        milestones = [int(round(m * iters_per_epoch)) for m in s["milestones"]]
        return WarmupScheduler(optimizer, warmup_iters, "multistep", total_iters,
                               milestones=milestones, gamma=s.get("gamma", 0.1))
    if schedule == "cosine":
        return WarmupScheduler(optimizer, warmup_iters, "cosine", total_iters,
                               min_lr_ratio=s.get("min_lr_ratio", 0.0))
    return WarmupScheduler(optimizer, warmup_iters, "constant", total_iters)
