"""TrainState: the one object that holds what a training run changes (detr passes the same pieces to
``train_one_epoch`` as explicit arguments).

Modules and optimiser objects: ``model`` (possibly wrapped in DDP), ``ema`` (or None), ``optimizer``,
``lr_scheduler``, ``scaler`` (a disabled GradScaler without float16 AMP). Counters: ``epoch`` (the next epoch
to train), ``step`` (optimisation steps done, skipped ones included), ``best_ap``, ``nonfinite_skipped``,
``amp_overflow_steps``; ``last_saved_epoch`` (the epoch of the newest last.pth of this run, not saved).

``state_dict()`` / ``load_state_dict()`` give and take the tensors and numbers a resume needs (the model
unwrapped); the checkpoint file around them (epoch, config, classes, RNG) is src/solver/checkpointing.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from src.misc import dist

COUNTERS = ("step", "best_ap", "nonfinite_skipped", "amp_overflow_steps")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Optional[Any] = None
    epoch: int = 0
    step: int = 0
    best_ap: float = -1.0
    nonfinite_skipped: int = 0
    amp_overflow_steps: int = 0
    last_saved_epoch: Optional[int] = None

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return dist.unwrap_model(self.model)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "best_ap": self.best_ap,
                "nonfinite_skipped": self.nonfinite_skipped, "amp_overflow_steps": self.amp_overflow_steps}

    def load_state_dict(self, state: dict):
        """Model, EMA (when both have one), optimizer, scheduler and the counters; the GradScaler is left to
        the caller (its state depends on how the checkpoint and this run use AMP: checkpointing.load_scaler)."""
        self.module.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])
        self.best_ap = float(state["best_ap"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.amp_overflow_steps = int(state.get("amp_overflow_steps", 0))
