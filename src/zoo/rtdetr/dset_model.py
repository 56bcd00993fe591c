"""DSETRTDETR: the RT-DETR detector whose output dict also carries what the DSET losses and diagnostics need.

Same modules, same state dict as ``RTDETR`` (backbone, encoder, decoder); the forward adds to the decoder's
dict (keys documented in ``dset_losses``):

- ``input_shape``: (H, W) of the padded input batch;
- ``dset_prune_info``: the encoder's per-level pruner info of this forward (empty without pruners);
- ``dset_moe_encoder`` / ``dset_moe_decoder``: per MoE layer of that part, ``name`` (its path inside the
  part), ``balance_loss``, ``expert_fraction``, ``router_prob`` (empty on the dense export path).

So the criterion (``DSETCriterion``) and the hook read one dict and nothing off the modules.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from src.core.registry import register
from src.zoo.rtdetr.dset_decoder import DSETTransformerv2
from src.zoo.rtdetr.dset_encoder import DSETHybridEncoder
from src.zoo.rtdetr.moe import MoEFFN
from src.zoo.rtdetr.rtdetr import RTDETR

__all__ = ["DSETRTDETR"]


def moe_layer_names(part: nn.Module) -> Tuple[str, ...]:
    """Paths (inside ``part``) of its MoEFFN layers, in module order."""
    return tuple(name for name, m in part.named_modules() if isinstance(m, MoEFFN))


@register()
class DSETRTDETR(RTDETR):
    """``RTDETR`` plus the DSET entries of the output dict (see the module docstring)."""

    __inject__ = ["backbone", "encoder", "decoder"]
    __sections__ = ["dset"]

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module, dset: Optional[Any] = None):
        super().__init__(backbone, encoder, decoder)
        if dset is not None:
            for part, module, cls in (("encoder", encoder, DSETHybridEncoder), ("decoder", decoder, DSETTransformerv2)):
                if not isinstance(module, cls):
                    raise ValueError(f"DSETRTDETR.{part} is {type(module).__name__} but the dset: section is on, "
                                     f"which needs {cls.__name__} (configs/include/dset.yaml); a plain {part} would "
                                     f"train without DSET's pruners / experts and say nothing")
            dset.cass.level_configs(len(encoder.pruners))  # a per-level cass_normalization must fit the levels
        self._moe_names = {"encoder": moe_layer_names(encoder), "decoder": moe_layer_names(decoder)}

    def forward(self, x: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, Any]:
        outputs = super().forward(x, targets)
        outputs["input_shape"] = (int(x.shape[-2]), int(x.shape[-1]))
        outputs["dset_prune_info"] = list(getattr(self.encoder, "last_prune_info", None) or [])
        for part, names in self._moe_names.items():
            module = getattr(self, part)
            layers = []
            for name in names:
                aux = module.get_submodule(name).last_aux
                if aux is not None:
                    layers.append({"name": name, **aux})
            outputs[f"dset_moe_{part}"] = layers
        return outputs
