"""DSETHybridEncoder: the RT-DETRv2 hybrid encoder with DSET's token pruners and (optionally) encoder experts.

Built from the ``HybridEncoder:`` section (``__config_section__``) plus the validated ``dset:`` settings; with
``dset`` None (``dset.enabled: false``) it is exactly the plain encoder. It uses the plain encoder's two
extension points:

- ``build_attention_extras``: one ``PatchLevelPruner`` per attended level (``dset.pruner``), and the AIFI
  FFNs become mixtures of experts when ``dset.moe.encoder_num_experts > 0`` (built at the plain encoder's
  point of construction, so the initialisation order, and with it a seeded run, is unchanged);
- ``attend_tokens``: prune, attend among the kept tokens with their gathered position embeddings, scatter
  back over the level's projected map (pruned cells keep their projected features).

After every forward, ``last_prune_info`` holds one pruner info dict per attended level (read by
``DSETRTDETR`` into the output dict).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from src.core.registry import register
from src.nn.rows import scatter_rows
from src.zoo.rtdetr.dset_config import DSETConfig
from src.zoo.rtdetr.hybrid_encoder import HybridEncoder
from src.zoo.rtdetr.moe import replace_ffn_with_moe
from src.zoo.rtdetr.patch_level_pruning import PatchLevelPruner

__all__ = ["DSETHybridEncoder"]


@register()
class DSETHybridEncoder(HybridEncoder):
    """HybridEncoder(**its section) + ``dset``; forward as HybridEncoder, with pruned attention."""

    __config_section__ = "HybridEncoder"
    __sections__ = ["dset"]

    def __init__(self, *args, dset: Optional[DSETConfig] = None, **kwargs):
        object.__setattr__(self, "_dset_settings", dset)  # read by build_attention_extras during super().__init__
        super().__init__(*args, **kwargs)

    def build_attention_extras(self):
        dset = self._dset_settings
        self.pruners: Optional[nn.ModuleList] = None
        self.last_prune_info: List[dict] = []
        if dset is None:
            return
        pruner_kwargs = dset.pruner.kwargs(self.hidden_dim)
        self.pruners = nn.ModuleList(PatchLevelPruner(**pruner_kwargs) for _ in self.use_encoder_idx)
        if dset.moe.encoder_num_experts > 0:
            for enc in self.encoder:
                for layer in enc.layers:
                    replace_ffn_with_moe(layer, dset.moe.encoder_num_experts, dset.moe.encoder_top_k,
                                         dset.moe.noise_std, self.enc_act, dset.moe.dispatch)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        self.last_prune_info = []
        return super().forward(feats)

    def attend_tokens(self, enc_i: int, src: torch.Tensor, pos_embed: torch.Tensor, hw,
                      src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pruners is None:
            return super().attend_tokens(enc_i, src, pos_embed, hw, src_key_padding_mask)
        return self._encode_pruned(enc_i, src, pos_embed, hw)

    def _encode_pruned(self, enc_i: int, src: torch.Tensor, pos_embed: torch.Tensor, hw) -> torch.Tensor:
        """Prune, attend among kept tokens, scatter back. src [B, N, C], pos_embed [1, N, C] -> [B, N, C].

        Invalid slots (patch cells beyond the map edge) are key-padding for the attention and are
        not scattered back; pruned cells keep their input features.
        """
        kept, kept_idx, info = self.pruners[enc_i](src, hw)
        self.last_prune_info.append(info)
        if not info["pruned"]:
            return self.encoder[enc_i](src, pos_embed=pos_embed)
        b, n, c = src.shape
        if pos_embed.shape[0] != 1:
            raise ValueError(f"DSET encoder: pos_embed must be one table [1, N, C] shared by the batch, got "
                             f"{tuple(pos_embed.shape)}")
        # shared by the batch: one row gather from it, no [B, N, C] copy
        kept_pos = pos_embed[0].index_select(0, kept_idx.flatten()).reshape(b, -1, c)
        patch = self.pruners[enc_i].patch_size
        if int(hw[0]) % patch == 0 and int(hw[1]) % patch == 0:
            # whole patches (a static fact of the map size): every slot is a real cell, so the attention needs
            # no key-padding mask (the mask-free kernel) and the scatter no scratch row; same outputs
            memory = self.encoder[enc_i](kept, pos_embed=kept_pos)
            return scatter_rows(src, kept_idx, memory)
        valid = info["kept_valid"]
        memory = self.encoder[enc_i](kept, pos_embed=kept_pos, src_key_padding_mask=~valid)
        # scatter valid slots back; invalid slots go to a scratch row n that is dropped afterwards
        target_idx = torch.where(valid, kept_idx, torch.full_like(kept_idx, n))
        out = torch.cat([src, src.new_zeros(b, 1, c)], dim=1)
        return scatter_rows(out, target_idx, memory)[:, :n]
