"""RT-DETR detector: backbone -> hybrid encoder -> transformer decoder (state-dict prefixes
``backbone.``, ``encoder.``, ``decoder.``)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from src.core.registry import register

__all__ = ["RTDETR"]


@register()
class RTDETR(nn.Module):
    """``decoder(encoder(backbone(images)), targets)``.

    Args (injected components, built from their config sections):
        backbone: images [B, 3, H, W] -> list of multi-scale maps (e.g. PResNet).
        encoder: that list -> list of [B, C, H_i, W_i] (e.g. HybridEncoder).
        decoder: (list of maps, targets) -> dict with ``pred_logits`` [B, Q, K], ``pred_boxes`` [B, Q, 4]
            (normalised cxcywh) and, in training, auxiliary / denoising outputs.

    DSET's subclass (``dset_model.DSETRTDETR``) adds what its losses need to the output dict.

    forward(x [B, 3, H, W], targets: optional list of per-image dicts with ``labels`` [n] and ``boxes``
    [n, 4] (needed by the decoder's denoising queries in training)) -> the decoder's dict.
    """

    __inject__ = ["backbone", "encoder", "decoder"]

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder  # registered before the encoder: the official state-dict order
        self.encoder = encoder

    def forward(self, x: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, Any]:
        feats = self.backbone(x)
        feats = self.encoder(feats)
        return self.decoder(feats, targets)
