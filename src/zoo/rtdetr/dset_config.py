"""The ``dset:`` YAML section: every key, its default, its range. One source of truth for validation and docs.

DSET is on when the section is present and ``enabled`` is true. Keys not listed are errors. The section is
validated once (``validate_dset``) into a frozen ``DSETConfig`` with a pruner, a CASS and a MoE part; the
components that need it (the DSET criterion, the encoder's pruners and experts, the decoder's experts, the
DSET hook) receive that object, never the raw mapping.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from src.core.registry import register_section
from src.zoo.rtdetr.cass_targets import NORMALIZATIONS, CASSConfig
from src.zoo.rtdetr.moe import MOE_DISPATCHES


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
_dispatch_check, _dispatch_rule = _choice(*MOE_DISPATCHES)
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
    "moe_dispatch": Key("auto", str, _dispatch_check, _dispatch_rule,
                        "how tokens reach their experts: auto = dense on CUDA (static shapes, no host sync, "
                        "E/top_k x the expert FLOPs), sorted elsewhere (one host read per layer)"),
    "vis_interval": Key(0, int, *_nonneg, "log mask pictures every N steps (0 = never)"),
}

PRUNER_KEYS = ("input_dim", "patch_size", "keep_ratio", "min_patches", "prune_in_eval",
               "token_pruning_warmup_epochs", "straight_through_gate")
CASS_TARGET_KEYS = {"cass_expansion_ratio": "expansion_ratio", "cass_min_size": "min_size",
                    "cass_decay_type": "decay_type", "use_subpixel_offset": "use_subpixel_offset",
                    "cass_loss_type": "loss_type", "cass_focal_alpha": "focal_alpha",
                    "cass_focal_beta": "focal_beta", "cass_bg_weight": "bg_weight",
                    "cass_spatial_reg": "spatial_reg"}  # dset key -> CASSConfig field


@dataclass(frozen=True)
class PrunerSettings:
    """The PatchLevelPruner arguments (``kwargs(hidden_dim)``); ``input_dim`` None = the encoder's width."""
    input_dim: Optional[int]
    patch_size: int
    keep_ratio: float
    min_patches: int
    prune_in_eval: bool
    token_pruning_warmup_epochs: int
    straight_through_gate: bool

    def kwargs(self, hidden_dim: int) -> dict:
        if self.input_dim is not None and self.input_dim != hidden_dim:
            raise ValueError(f"dset.input_dim = {self.input_dim} must equal HybridEncoder.hidden_dim = {hidden_dim} "
                             f"(or be null)")
        return {**{k: getattr(self, k) for k in PRUNER_KEYS}, "input_dim": hidden_dim}


@dataclass(frozen=True)
class CASSSettings:
    """Whether and how strongly CASS supervises the pruner, and its target / loss settings.

    ``normalization``: one mode for every pruned level, or a tuple with one per level; ``target`` is the
    CASSConfig of the first level's mode (the soft target itself does not depend on the mode)."""
    enabled: bool
    loss_weight: float
    warmup_epochs: int
    normalization: Union[str, Tuple[str, ...]]
    target: CASSConfig

    def ramp(self, epoch: Optional[int]) -> float:
        """The warmup factor ``min(1, epoch / warmup_epochs)`` (1 when warmup is 0 or the epoch unknown)."""
        warm = self.warmup_epochs
        return 1.0 if warm == 0 or epoch is None else min(1.0, epoch / warm)

    def weight_at(self, epoch: Optional[int]) -> float:
        """``loss_weight * ramp(epoch)``: the CASS weight of an epoch."""
        return self.loss_weight * self.ramp(epoch)

    def level_configs(self, num_levels: int) -> List[CASSConfig]:
        """One CASSConfig per pruned level (HybridEncoder.use_encoder_idx order). Raises ValueError when a
        per-level list does not have ``num_levels`` entries."""
        return [dataclasses.replace(self.target, normalization=m)
                for m in level_normalizations(self.normalization, num_levels)]


@dataclass(frozen=True)
class MoESettings:
    """Mixture-of-experts FFNs: decoder (``num_experts``, ...) and encoder AIFI (``encoder_*``); 0 = dense."""
    num_experts: int
    top_k: int
    noise_std: float
    balance_weight: float
    encoder_num_experts: int
    encoder_top_k: int
    encoder_balance_weight: float
    dispatch: str = "auto"   # moe.MOE_DISPATCHES


@dataclass(frozen=True)
class DSETConfig:
    """The validated ``dset:`` section, built once by ``validate_dset`` and handed to the components that
    declare ``__sections__ = ["dset"]``. ``values``: every key with its value (defaults filled in), read-only,
    for logs and tools."""
    pruner: PrunerSettings
    cass: CASSSettings
    moe: MoESettings
    vis_interval: int
    values: Mapping[str, Any]

    def __deepcopy__(self, memo):  # immutable: a deep copy of a model holding it (the EMA) shares it
        return self

    def __reduce__(self):  # picklable (the read-only mapping is not): rebuilt from its values
        return _build, (dict(self.values),)


def _build(out: dict) -> DSETConfig:
    norm = out["cass_normalization"]
    norm = norm if isinstance(norm, str) else tuple(norm)
    target = CASSConfig(normalization=norm if isinstance(norm, str) else norm[0],
                        **{field: out[key] for key, field in CASS_TARGET_KEYS.items()})
    return DSETConfig(
        pruner=PrunerSettings(**{k: out[k] for k in PRUNER_KEYS}),
        cass=CASSSettings(enabled=out["use_cass"], loss_weight=out["cass_loss_weight"],
                          warmup_epochs=out["cass_warmup_epochs"], normalization=norm, target=target),
        moe=MoESettings(num_experts=out["num_experts"], top_k=out["top_k"], noise_std=out["moe_noise_std"],
                        balance_weight=out["moe_balance_weight"], encoder_num_experts=out["encoder_moe_num_experts"],
                        encoder_top_k=out["encoder_moe_top_k"],
                        encoder_balance_weight=out["encoder_moe_balance_weight"], dispatch=out["moe_dispatch"]),
        vis_interval=out["vis_interval"],
        values=MappingProxyType({k: (tuple(v) if isinstance(v, list) else v) for k, v in out.items()}))


def validate_dset(section: dict | None, where: str | Callable[[str | None], str] = "dset") -> DSETConfig | None:
    """Return the frozen DSETConfig of the section (defaults filled in) or None when DSET is off.

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
    return _build(out)


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


register_section("dset", validate_dset, "DSET settings (pruner, MoE, CASS); see docs/dset.md",
                 requires={"model": "DSETRTDETR", "criterion": "DSETCriterion"})
# (DSETRTDETR's own section in configs/include/dset.yaml names DSETHybridEncoder and DSETTransformerv2)


def dset_table_markdown() -> str:
    """Markdown table of every key (used to keep docs/dset.md in sync; see tests)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, key in DSET_KEYS.items():
        rows.append(f"| `{name}` | `{key.default}` | {key.rule} | {key.doc} |")
    return "\n".join(rows)
