"""The ``dset:`` YAML section: every key, its default, its range. One source of truth for validation and docs.

DSET is on when the section is present and ``enabled`` is true. Keys not listed are errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from src.core.registry import register_section
from src.zoo.rtdetr.cass import NORMALIZATIONS


@dataclass(frozen=True)
class Key:
    default: Any
    kind: type | Tuple[type, ...]
    check: Callable[[Any], bool] | None
    rule: str
    doc: str


def _choice(*values):
    return (lambda v: v in values), "one of " + ", ".join(values)


_norm_rule = ("one of " + ", ".join(NORMALIZATIONS) + ", or a list with one of them per pruned level "
              "(HybridEncoder.use_encoder_idx order, e.g. [object_balanced, area_patch] for P4, P5)")


def _norm_check(value) -> bool:
    if isinstance(value, str):
        return value in NORMALIZATIONS
    return isinstance(value, list) and len(value) >= 1 and all(isinstance(v, str) and v in NORMALIZATIONS
                                                               for v in value)
_decay_check, _decay_rule = _choice("gaussian", "linear")
_loss_check, _loss_rule = _choice("mse", "focal", "vfl")
_nonneg = (lambda v: v >= 0, ">= 0")
_pos_int = (lambda v: v >= 1, ">= 1")

DSET_KEYS: Dict[str, Key] = {
    "enabled": Key(True, bool, None, "true/false", "turn DSET (pruner, MoE, CASS) on or off"),
    "input_dim": Key(None, (int, type(None)), lambda v: v is None or v >= 1, ">= 1 or null",
                     "pruner token dim; null = encoder hidden_dim"),
    "patch_size": Key(4, int, *_pos_int, "patch side in feature cells"),
    "keep_ratio": Key(0.3, (int, float), lambda v: 0 < v <= 1, "in (0, 1]", "fraction of patches kept"),
    "min_patches": Key(1, int, *_pos_int, "lower bound on kept patches"),
    "prune_in_eval": Key(True, bool, None, "true/false", "prune at evaluation too"),
    "token_pruning_warmup_epochs": Key(0, int, *_nonneg,
                                       "epochs without pruning, then as many epochs of linear ramp to keep_ratio"),
    "straight_through_gate": Key(True, bool, None, "true/false",
                                 "let the detection loss reach the pruner through a straight-through gate"),
    "use_cass": Key(True, bool, None, "true/false", "add the CASS loss"),
    "cass_loss_weight": Key(0.05, (int, float), *_nonneg, "weight of the CASS loss"),
    "cass_warmup_epochs": Key(0, int, *_nonneg, "CASS weight ramps linearly from 0 over these epochs"),
    "cass_expansion_ratio": Key(0.8, (int, float), *_nonneg, "context band width r"),
    "cass_min_size": Key(2.0, (int, float), *_nonneg, "min box side in feature cells"),
    "cass_decay_type": Key("gaussian", str, _decay_check, _decay_rule, "band decay"),
    "use_subpixel_offset": Key(True, bool, None, "true/false", "float box coordinates (else snapped outward)"),
    "cass_loss_type": Key("focal", str, _loss_check, _loss_rule, "per-patch loss"),
    "cass_focal_alpha": Key(2.0, (int, float), *_nonneg, "focal alpha"),
    "cass_focal_beta": Key(4.0, (int, float), *_nonneg, "focal beta"),
    "cass_normalization": Key("patch", (str, list), _norm_check, _norm_rule,
                              "how the CASS loss is normalised (one mode, or one per pruned level)"),
    "cass_bg_weight": Key(1.0, (int, float), *_nonneg, "background term weight (area_patch, object_balanced)"),
    "cass_spatial_reg": Key(0.0, (int, float), *_nonneg, "spatial smoothness weight"),
    "num_experts": Key(4, int, *_nonneg, "decoder FFN experts; 0 = dense FFN"),
    "top_k": Key(2, int, *_pos_int, "experts per token (decoder)"),
    "moe_noise_std": Key(0.1, (int, float), *_nonneg, "noisy top-k gating std"),
    "moe_balance_weight": Key(0.01, (int, float), *_nonneg, "decoder load-balancing loss weight"),
    "encoder_moe_num_experts": Key(0, int, *_nonneg, "encoder (AIFI) FFN experts; 0 = dense FFN"),
    "encoder_moe_top_k": Key(2, int, *_pos_int, "experts per token (encoder)"),
    "encoder_moe_balance_weight": Key(0.001, (int, float), *_nonneg, "encoder load-balancing loss weight"),
    "vis_interval": Key(0, int, *_nonneg, "log mask pictures every N steps (0 = never)"),
}

PRUNER_KEYS = ("input_dim", "patch_size", "keep_ratio", "min_patches", "prune_in_eval",
               "token_pruning_warmup_epochs", "straight_through_gate", "use_cass", "cass_expansion_ratio",
               "cass_min_size", "cass_decay_type", "use_subpixel_offset", "cass_loss_type", "cass_focal_alpha",
               "cass_focal_beta", "cass_normalization", "cass_bg_weight", "cass_spatial_reg")


def validate_dset(section: dict | None, where: str | Callable[[str | None], str] = "dset") -> dict | None:
    """Return the full dset settings (defaults filled in) or None when DSET is off.

    ``where``: a prefix such as ``"file.yaml: dset"``, or a function of the key name (None for the section)
    returning ``"<file that set it>: dset.<key>"``. Raises ValueError naming the key, the bad value and the
    allowed range or choices.
    """
    at = where if callable(where) else (lambda key: where if key is None else f"{where}.{key}")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"{at(None)}: must be a mapping of DSET settings, got {section!r}")
    unknown = sorted(set(section) - set(DSET_KEYS))
    if unknown:
        raise ValueError(f"{at(unknown[0])}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(DSET_KEYS))}")
    out = {}
    for name, key in DSET_KEYS.items():
        value = section.get(name, key.default)
        kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok_type = False
        else:
            ok_type = isinstance(value, kinds)
        if not ok_type or (key.check is not None and not key.check(value)):
            raise ValueError(f"{at(name)} = {value!r} is invalid: must be {key.rule} ({key.doc})")
        out[name] = value
    if out["num_experts"] and out["top_k"] > out["num_experts"]:
        raise ValueError(f"{at('top_k')} = {out['top_k']} is larger than dset.num_experts = "
                         f"{out['num_experts']}: set top_k <= num_experts")
    if out["encoder_moe_num_experts"] and out["encoder_moe_top_k"] > out["encoder_moe_num_experts"]:
        raise ValueError(f"{at('encoder_moe_top_k')} = {out['encoder_moe_top_k']} is larger than "
                         f"dset.encoder_moe_num_experts = {out['encoder_moe_num_experts']}")
    if not out["enabled"]:
        return None
    return out


def level_normalizations(value, num_levels: int) -> List[str]:
    """`dset.cass_normalization` as one mode per pruned level: a single mode is used on every level, a list
    must have exactly `num_levels` entries (HybridEncoder.use_encoder_idx order). Raises ValueError."""
    if isinstance(value, str):
        return [value] * num_levels
    if len(value) != num_levels:
        raise ValueError(f"dset.cass_normalization = {value!r} has {len(value)} entries but the encoder prunes "
                         f"{num_levels} level(s) (HybridEncoder.use_encoder_idx): give one mode per pruned level "
                         f"or a single mode for all")
    return list(value)


register_section("dset", validate_dset, "DSET settings (pruner, MoE, CASS); see docs/dset.md")


def dset_table_markdown() -> str:
    """Markdown table of every key (used to keep docs/dset.md in sync; see tests)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, key in DSET_KEYS.items():
        rows.append(f"| `{name}` | `{key.default}` | {key.rule} | {key.doc} |")
    return "\n".join(rows)
