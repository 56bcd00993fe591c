"""The one activation lookup: config string -> module."""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
               "hardsigmoid": nn.Hardsigmoid}


def get_activation(name: str | None) -> nn.Module:
    """Activation module for ``name`` (``None`` -> identity). Known: relu, silu, gelu, leaky_relu, hardsigmoid."""
    if name is None:
        return nn.Identity()
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[key]()
