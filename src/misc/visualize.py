"""Pictures for TensorBoard: patch maps over an image, heat overlays, boxes (model-agnostic; the DSET mask
picture built from them is in src/zoo/rtdetr/dset_hooks.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_map_to_image(values: Tensor, grid, patch_px, img_hw) -> Tensor:
    """[P] patch values on a (P_h, P_w) grid -> [H, W] map over the image (nearest, cropped to the image).

    patch_px: (py, px) size of one patch in input pixels (patch_size * stride).
    """
    ph, pw = grid
    m = values.reshape(1, 1, ph, pw).float()
    up = F.interpolate(m, size=(int(round(ph * patch_px[0])), int(round(pw * patch_px[1]))), mode="nearest")[0, 0]
    H, W = img_hw
    out = up.new_zeros(H, W)
    h, w = min(H, up.shape[0]), min(W, up.shape[1])
    out[:h, :w] = up[:h, :w]
    return out


def overlay(image: Tensor, heat: Tensor, alpha: float = 0.55) -> Tensor:
    """image [3, H, W] in [0, 1], heat [H, W] in [0, 1] -> [3, H, W] in [0, 1] (heat shown in red/yellow)."""
    colour = torch.stack([heat, heat.pow(2), torch.zeros_like(heat)])
    return ((1 - alpha) * image.clamp(0, 1) + alpha * colour).clamp(0, 1)


def draw_boxes(image: Tensor, boxes: Tensor) -> Tensor:
    """Draw xyxy pixel boxes in green with torchvision's drawing utility. image [3,H,W] in [0,1]."""
    from torchvision.utils import draw_bounding_boxes

    img = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
    if boxes.numel():
        img = draw_bounding_boxes(img, boxes.detach().cpu().float(), colors="lime", width=1)
    return img.float() / 255
