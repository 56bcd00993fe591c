"""DSETTransformerv2: the RT-DETRv2 decoder whose FFNs are DSET's mixtures of experts.

Built from the ``RTDETRTransformerv2:`` section (``__config_section__``) plus the validated ``dset:`` settings;
with ``dset`` None or ``dset.moe.num_experts == 0`` it is exactly the plain decoder. The experts replace each
layer's dense FFN at the plain decoder's ``build_decoder_extras`` point of construction (same
initialisation order).
"""
from __future__ import annotations

from typing import Optional

from src.core.registry import register
from src.zoo.rtdetr.dset_config import DSETConfig
from src.zoo.rtdetr.moe import replace_ffn_with_moe
from src.zoo.rtdetr.rtdetrv2_decoder import RTDETRTransformerv2

__all__ = ["DSETTransformerv2"]


@register()
class DSETTransformerv2(RTDETRTransformerv2):
    """RTDETRTransformerv2(**its section) + ``dset`` (decoder experts: ``dset.moe``)."""

    __config_section__ = "RTDETRTransformerv2"
    __sections__ = ["dset"]

    def __init__(self, *args, dset: Optional[DSETConfig] = None, **kwargs):
        object.__setattr__(self, "_dset_settings", dset)  # read by build_decoder_extras during super().__init__
        super().__init__(*args, **kwargs)

    def build_decoder_extras(self):
        dset = self._dset_settings
        if dset is not None and dset.moe.num_experts > 0:
            for layer in self.decoder.layers:
                replace_ffn_with_moe(layer, dset.moe.num_experts, dset.moe.top_k, dset.moe.noise_std,
                                     self.ffn_activation, dset.moe.dispatch)
