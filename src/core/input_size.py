"""``input_size: [h, w]``: one key for the network input size.

The input size appears in three places of an RT-DETR config: the ``Resize`` op of the training
pipeline, the ``Resize`` op of the validation pipeline, and ``eval_spatial_size`` (the size whose
anchors and position embeddings the model precomputes). ``apply_input_size`` fills all three from
``input_size`` when the merged config sets it, before validation:

* a place that does not give a size gets ``input_size`` (the repository's configs leave them all out);
* a place that gives the same size is fine;
* a place that gives another size is an error naming both files, so two sizes can never silently differ.

Without ``input_size`` nothing changes (``eval_spatial_size`` and every ``Resize.size`` must be given).
"""
from __future__ import annotations

from typing import Callable, List, Tuple

from src.core.yaml_utils import ConfigError, Origins

INPUT_SIZE_KEY = "input_size"
STRIDE = 32  # the collate pads to a multiple of 32; the backbone's largest stride
LOADERS = ("train_dataloader", "val_dataloader")


def resize_ops(cfg: dict) -> List[Tuple[tuple, dict]]:
    """(key path, op mapping) of every ``{type: Resize}`` op in the train/val pipelines."""
    out = []
    for loader in LOADERS:
        ops = (((cfg.get(loader) or {}).get("dataset") or {}).get("transforms") or {})
        ops = ops.get("ops") if isinstance(ops, dict) else None
        for i, op in enumerate(ops or []):
            if isinstance(op, dict) and op.get("type") == "Resize":
                out.append(((loader, "dataset", "transforms", "ops", i), op))
    return out


def check_input_size(value, where: str) -> List[int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"{where} = {value!r}: must be [height, width], two positive integers")
    if any(v % STRIDE for v in value):
        raise ConfigError(f"{where} = {list(value)}: both sides must be multiples of {STRIDE} (the collate pads "
                          f"inputs to a multiple of {STRIDE}, so another size would not be the size the model "
                          f"sees); e.g. {[max(STRIDE, round(v / STRIDE) * STRIDE) for v in value]}")
    return [int(v) for v in value]


def apply_input_size(cfg: dict, origins: Origins, where: Callable[[tuple], str]) -> None:
    """Fill ``eval_spatial_size`` and every train/val ``Resize.size`` from ``cfg['input_size']`` (in place).

    ``where(path)`` names the file that set a key path (for errors); filled keys are recorded in
    ``origins`` as coming from the file that set ``input_size``."""
    if cfg.get(INPUT_SIZE_KEY) is None:
        return
    size = check_input_size(cfg[INPUT_SIZE_KEY], where((INPUT_SIZE_KEY,)))
    source = origins.get((INPUT_SIZE_KEY,), "input_size")
    places = [(("eval_spatial_size",), cfg, "eval_spatial_size")]
    places += [(path + ("size",), op, "size") for path, op in resize_ops(cfg)]
    for path, holder, key in places:
        given = holder.get(key)
        if given is None:
            holder[key] = list(size)
            origins[path] = source
        elif list(given) != size:
            raise ConfigError(f"{where(path)} = {list(given)} differs from input_size = {size} "
                              f"({where((INPUT_SIZE_KEY,))}); input_size sets this size: remove the explicit "
                              f"value (or make it equal)")
