"""The state-dict adapters that let official RT-DETRv2 weights load into our models (plain or DSET).

``load_pretrained(model, path)`` (src/misc/checkpoint.py) = safe load + format unwrapping + the registered
adapters (the two below, registered when this package is imported) + a report of what was loaded, skipped
(shape mismatch: e.g. class heads for another number of classes) and re-initialised. Re-exported here.
"""
from __future__ import annotations

import re
from typing import List, Tuple

from src.misc.checkpoint import load_pretrained  # noqa: F401  (re-exported: the loader these adapters serve)
from src.misc.checkpoint import register_weight_adapter
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


# the adapters of this model family, applied by load_pretrained (src/misc/checkpoint.py) in this order
register_weight_adapter(copy_single_aifi_to_all_levels)
register_weight_adapter(expand_dense_ffn_state)
