"""Optimizer construction with regex-selected parameter groups (RT-DETR config format).

Config format (one YAML section)::

    optimizer:
      type: AdamW                       # or SGD
      params:                           # optional list of groups, matched in order
        - params: '^(?=.*backbone)(?!.*(?:norm|bn|bias)).*$'   # regex, re.search on param names
          lr: 0.00001                   # any optimizer keyword overrides the default for the group
        - params: '^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$'
          weight_decay: 0.
          name: enc_dec_no_decay        # optional; otherwise 'group{i}'
      lr: 0.0001                        # defaults for every group (and the 'default' group)
      betas: [0.9, 0.999]
      weight_decay: 0.0001

Rules: only trainable parameters (``requires_grad``) are grouped; a parameter matched by two
groups is an error; a group matching nothing is an error (probably a typo in the regex);
trainable parameters matched by no group go to a last group named ``'default'`` that uses
the top-level settings. Every group carries a ``'name'`` key (kept by torch in
``optimizer.param_groups``) for logging learning rates per group.
"""
from __future__ import annotations

import inspect
import re
from typing import Dict, List

import torch
import torch.nn as nn

__all__ = ["OPTIMIZERS", "RTDETR_PARAM_GROUPS", "build_optimizer", "check_param_groups",
           "params_with_unwanted_weight_decay"]

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}

# Substrings that identify normalisation layers and biases in parameter names.
_NO_DECAY = r"(?:norm|bn|bias)"

# Default groups for RT-DETR(v2) R18 fine-tuning (the official r18 recipe, with biases added
# to the no-weight-decay groups):
#   backbone weights          : lr 1e-5 (10x below the base lr), weight decay as the default
#   backbone norms and biases : lr 1e-5, no weight decay
#   encoder / decoder norms and biases : base lr, no weight decay
# Everything else (encoder/decoder weights, pruner, experts, heads, embeddings) is 'default'.
# Names are assumed to contain 'norm' or 'bn' for normalisation layers (PResNet's
# ConvNormLayer uses '.norm.', the hybrid encoder/decoder use 'norm1', 'norm2', ...).
# Use ``params_with_unwanted_weight_decay`` in a test to verify this on the real model.
RTDETR_PARAM_GROUPS: List[dict] = [
    {"name": "backbone", "params": rf"^(?=.*backbone)(?!.*{_NO_DECAY}).*$", "lr": 1e-5},
    {"name": "backbone_norm_bias", "params": rf"^(?=.*backbone)(?=.*{_NO_DECAY}).*$",
     "lr": 1e-5, "weight_decay": 0.0},
    {"name": "enc_dec_norm_bias", "params": rf"^(?=.*(?:encoder|decoder))(?=.*{_NO_DECAY}).*$",
     "weight_decay": 0.0},
]


def _valid_optimizer_keys(opt_cls) -> List[str]:
    keys = [k for k in inspect.signature(opt_cls.__init__).parameters if k not in ("self", "params")]
    return sorted(keys)


def _check_keys(given: dict, valid: List[str], where: str) -> None:
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")


def build_optimizer(model: nn.Module, cfg: dict, where: str = "optimizer") -> torch.optim.Optimizer:
    """Build an AdamW/SGD optimizer from an RT-DETR style config dict (see module docstring).

    Args:
        model: the (unwrapped or DDP-wrapped) model; names come from ``model.named_parameters()``.
        cfg: ``{'type': 'AdamW'|'SGD', 'params': [group, ...] (optional), **optimizer_kwargs}``.
        where: config location used in error messages.

    Returns:
        The optimizer; ``optimizer.param_groups[i]['name']`` is the group's name ('group{i}'
        unless the config gives ``name``, and 'default' for unmatched parameters).
    """
    cfg = dict(cfg)
    opt_type = cfg.pop("type", None)
    if opt_type not in OPTIMIZERS:
        raise KeyError(f"{where}.type: unknown optimizer {opt_type!r}; valid: {', '.join(OPTIMIZERS)}")
    opt_cls = OPTIMIZERS[opt_type]
    valid = _valid_optimizer_keys(opt_cls)
    group_cfgs = cfg.pop("params", None) or []
    _check_keys(cfg, valid, where)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    owner: Dict[str, int] = {}
    groups = []
    for i, gcfg in enumerate(group_cfgs):
        gwhere = f"{where}.params[{i}]"
        gcfg = dict(gcfg)
        if "params" not in gcfg or not isinstance(gcfg["params"], str):
            raise ValueError(f"{gwhere}: each group needs 'params': '<regex>' (got {gcfg!r})")
        pattern = gcfg.pop("params")
        name = gcfg.pop("name", f"group{i}")
        _check_keys(gcfg, valid, gwhere)
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{gwhere}: invalid regex {pattern!r}: {e}") from None
        names = [n for n in trainable if regex.search(n)]
        if not names:
            raise ValueError(f"{gwhere}: regex {pattern!r} matches no trainable parameter "
                             f"(typo? example names: {list(trainable)[:5]})")
        for n in names:
            if n in owner:
                other = group_cfgs[owner[n]]["params"]
                raise ValueError(f"{where}: parameter {n!r} is matched by two groups: "
                                 f"params[{owner[n]}] {other!r} and params[{i}] {pattern!r}; "
                                 f"make the regexes disjoint")
            owner[n] = i
        groups.append({"params": [trainable[n] for n in names], "name": name, **gcfg})

    rest = [p for n, p in trainable.items() if n not in owner]
    if rest:
        groups.append({"params": rest, "name": "default"})
    if not groups:
        raise ValueError(f"{where}: the model has no trainable parameters")
    return opt_cls(groups, **cfg)


def check_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Assert every trainable parameter is in exactly one group and no frozen one is present.

    Raises AssertionError naming the offending parameters.
    """
    counts: Dict[int, int] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    named = list(model.named_parameters())
    missing = [n for n, p in named if p.requires_grad and counts.get(id(p), 0) == 0]
    repeated = [n for n, p in named if counts.get(id(p), 0) > 1]
    frozen = [n for n, p in named if not p.requires_grad and counts.get(id(p), 0) > 0]
    known = {id(p) for _, p in named}
    foreign = sum(1 for pid in counts if pid not in known)
    problems = []
    if missing:
        problems.append(f"trainable parameters in no group: {missing}")
    if repeated:
        problems.append(f"parameters in more than one group: {repeated}")
    if frozen:
        problems.append(f"frozen parameters in a group: {frozen}")
    if foreign:
        problems.append(f"{foreign} optimizer parameters do not belong to the model")
    assert not problems, "optimizer parameter groups are inconsistent: " + "; ".join(problems)


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def params_with_unwanted_weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of normalisation-layer parameters and biases whose group has weight_decay > 0.

    Detects norms by module type (BatchNorm/LayerNorm/GroupNorm, incl. FrozenBatchNorm-like
    modules whose class name contains 'Norm'), so it checks the regexes independently.
    """
    decay_of = {id(p): g.get("weight_decay", 0.0) for g in optimizer.param_groups for p in g["params"]}
    bad = []
    for mname, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if (is_norm or pname == "bias") and decay_of.get(id(p), 0.0) > 0:
                bad.append(full)
    return bad
