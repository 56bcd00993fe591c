"""Loading official RT-DETRv2 weights into our models (plain or DSET).

``load_pretrained(model, path)`` = safe load + format unwrapping + the adapters below + a report of what
was loaded, skipped (shape mismatch: e.g. class heads for another number of classes) and re-initialised.
"""
from __future__ import annotations

import re
from typing import List, Tuple

from torch import nn

from src.misc.checkpoint import LoadReport, extract_state_dict, load_checkpoint, load_matching_weights
from src.zoo.rtdetr.moe import expand_dense_ffn_state

_AIFI = re.compile(r"^encoder\.encoder\.(\d+)\.(.*)$")


def copy_single_aifi_to_all_levels(state_dict: dict, model_state_dict: dict) -> Tuple[dict, List[str]]:
    """Adapter: the official R18 has one AIFI layer (``encoder.encoder.0``, on P5); DSET attends on P4 and P5
    (``encoder.encoder.0`` and ``.1``). Start every AIFI layer of the model from the checkpoint's single one.

    Applies only when the checkpoint has exactly one AIFI index and the model more than one.
    """
    src_ids = {m.group(1) for k in state_dict if (m := _AIFI.match(k))}
    dst_ids = sorted({m.group(1) for k in model_state_dict if (m := _AIFI.match(k))}, key=int)
    if len(src_ids) != 1 or len(dst_ids) <= 1:
        return state_dict, []
    (src,) = src_ids
    out = {k: v for k, v in state_dict.items() if not _AIFI.match(k)}
    for k, v in state_dict.items():
        m = _AIFI.match(k)
        if m:
            for dst in dst_ids:
                out[f"encoder.encoder.{dst}.{m.group(2)}"] = v
    # the checkpoint's single AIFI sat on the coarsest level; the model's last AIFI index is the coarsest
    return out, [f"AIFI: checkpoint encoder.encoder.{src} copied to encoder.encoder.{{{','.join(dst_ids)}}} "
                 f"(every attended level starts from the pretrained layer)"]


DEFAULT_ADAPTERS = (copy_single_aifi_to_all_levels, expand_dense_ffn_state)


def load_pretrained(model: nn.Module, path: str, trusted: bool = False, strict: bool = False) -> LoadReport:
    """Load weights from ``path`` (official ``{'ema': {'module': sd}}`` / ``{'model': sd}`` / bare state dict).

    ``strict=True``: every key and shape must match (the plain detector with the official checkpoint).
    Otherwise every matching tensor loads, and the rest stays at its initialisation (reported).
    """
    state = extract_state_dict(load_checkpoint(path, trusted=trusted))
    return load_matching_weights(model, state, adapters=() if strict else DEFAULT_ADAPTERS, strict=strict)
