"""Pictures for TensorBoard: CASS target mask and predicted keep probability over the input image."""
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


@torch.no_grad()
def cass_mask_figure(image: Tensor, gt_xyxy: Tensor, info: dict, dset: dict) -> Tensor:
    """Target Y (left) and predicted q = sigmoid(logit) (right) over the first image of a batch.

    image: [3, H, W] (the padded input, values in [0, 1]); gt_xyxy: [N, 4] absolute pixels of that input;
    info: one pruned level's info dict; returns a uint8 tensor [3, H, 2W].
    """
    from src.zoo.rtdetr import cass
    from src.zoo.rtdetr.dset_losses import cass_config_from_dset

    H, W = image.shape[-2:]
    h, w = info["feat_shape"]
    k = dset["patch_size"]
    grid = cass.patch_grid((h, w), k)
    target = cass.generate_soft_target_mask([gt_xyxy], (h, w), (H, W), k, cass_config_from_dset(dset))[0]
    q = info["patch_importance_scores"][0].detach().sigmoid()
    patch_px = (k * H / h, k * W / w)
    base = draw_boxes(image.float().cpu(), gt_xyxy)
    left = overlay(base, patch_map_to_image(target.cpu(), grid, patch_px, (H, W)))
    right = overlay(base, patch_map_to_image(q.cpu(), grid, patch_px, (H, W)))
    return (torch.cat([left, right], dim=-1) * 255).to(torch.uint8)
