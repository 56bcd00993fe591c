"""Training hooks: how a model family adds logging, pictures and evaluation without the trainer naming it
(detectron2's HookBase idea). Hooks add no loss: every loss term is the criterion's (a model family
registers its own criterion, e.g. DSETCriterion).

A model family subclasses ``TrainHook`` and registers a factory ``factory(cfg) -> list of hooks`` with
``register_hooks`` when its module is imported (by its package's ``__init__``, see src/__init__.py).
The trainer calls ``build_hooks(cfg)`` once and then each method at its point of the loop. Every method
has a do-nothing default, so a hook overrides only what it needs. Methods run on every rank unless
their docstring says otherwise; a hook must not issue collectives except where stated.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import Tensor, nn

_FACTORIES: List[Callable] = []


class TrainHook:
    def unused_parameter_reasons(self) -> List[str]:
        """Why some parameters may get no gradient in a step (DDP then needs find_unused_parameters)."""
        return []

    def step_scalars(self, outputs: dict, targets: List[dict], images: Tensor, model: nn.Module) -> Dict[str, float]:
        """Extra TensorBoard scalars of a logged step (every ``print_freq`` iterations)."""
        return {}

    def after_step(self, step: int, logger, outputs: dict, targets: List[dict], images: Tensor):
        """After every optimisation step that was applied (pictures, ...); ``step``: the steps done, this one
        included; ``logger``: the run's TrainLogger (disabled, ``logger.enabled`` False, on ranks other than 0)."""

    def before_eval(self):
        """Start of an evaluation: reset what ``eval_batch`` accumulates."""

    def eval_batch(self, outputs: dict, targets: List[dict], images: Tensor) -> Dict[str, Tensor]:
        """Sums to accumulate for one evaluation batch; the trainer all-reduces them over ranks (one collective
        per batch for all hooks' and its own sums) and passes the totals to ``eval_metrics``."""
        return {}

    def eval_metrics(self, sums: Dict[str, Tensor]) -> dict:
        """Entries added to the evaluation stats (e.g. ``{"dset_bias": {...}}``) from this hook's summed
        ``eval_batch`` values (empty when no batch returned any)."""
        return {}

    def eval_scalars(self, stats: dict) -> Dict[str, float]:
        """TensorBoard scalars of an evaluation (rank 0)."""
        return {}

    def eval_report(self, stats: dict) -> str:
        """Text printed under the metrics table (rank 0); empty: nothing."""
        return ""


def register_hooks(factory: Callable) -> Callable:
    """Register ``factory(cfg) -> List[TrainHook]`` (called once per trainer); usable as a decorator."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)
    return factory


def build_hooks(cfg) -> List[TrainHook]:
    return [hook for factory in _FACTORIES for hook in factory(cfg)]
