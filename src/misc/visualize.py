"""Pictures (model-agnostic): patch maps over an image, patch rectangles, and the matplotlib figures of
tools/infer.py (detections, kept patches) and of the DSET TensorBoard picture (src/zoo/rtdetr/dset_hooks.py)."""
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


# ---------------------------------------------------------------- matplotlib figures (tools/infer.py, TensorBoard)
def patch_rects(patch_idx: Tensor, grid, patch_px, clip_hw) -> Tensor:
    """Pixel rectangles of patches.

    Args:
        patch_idx: [n] long indices into the (P_h, P_w) grid (row-major).
        grid: (P_h, P_w); patch_px: (py, px) size of one patch in pixels; clip_hw: (H, W) the rectangles are
            clipped to (a partial last row/column of patches, or padding beyond the image content).
    Returns:
        [n, 4] float xyxy pixels (empty rectangles possible for patches entirely outside clip_hw).
    """
    pw = int(grid[1])
    rows, cols = (patch_idx // pw).float(), (patch_idx % pw).float()
    py, px = float(patch_px[0]), float(patch_px[1])
    rects = torch.stack([cols * px, rows * py, (cols + 1) * px, (rows + 1) * py], -1)
    h, w = clip_hw
    return torch.minimum(rects, rects.new_tensor([w, h, w, h]))


def rects_mask(rects: Tensor, hw) -> Tensor:
    """Union of xyxy pixel rectangles [n, 4] as a bool mask [H, W] (pixel centres inside a rectangle)."""
    h, w = hw
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    r = rects.float()
    inside_y = (ys[None, :] >= r[:, 1:2]) & (ys[None, :] < r[:, 3:4])   # [n, H]
    inside_x = (xs[None, :] >= r[:, 0:1]) & (xs[None, :] < r[:, 2:3])   # [n, W]
    return (inside_y.float().T @ inside_x.float()) > 0                  # [H, W]


def _outline(ax, rects, colour: str, width: float = 0.8, label: str | None = None):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    boxes = [Rectangle((float(x0), float(y0)), float(x1 - x0), float(y1 - y0)) for x0, y0, x1, y1 in rects.tolist()]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=colour, linewidth=width, label=label))


def _legend(ax, entries):
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=fc, edgecolor=ec, label=name) for name, fc, ec in entries],
              loc="lower right", fontsize=7, framealpha=0.8)


def _image_axis(ax, image, title: str):
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def detection_figure(image, boxes: Tensor, labels: Tensor, scores: Tensor, class_names, levels=(),
                     title: str = "", dim: float = 0.35):
    """The picture of tools/infer.py: detections and, per pruned level, the kept patches.

    Args:
        image: uint8 numpy [H, W, 3] (the original image).
        boxes [n, 4] xyxy pixels of ``image``, labels [n] long, scores [n]: detections to draw.
        class_names: name of each label.
        levels: (name, kept_rects [m, 4] xyxy pixels of image, keep_ratio) per pruned level: one panel each,
            pruned area dimmed to ``dim`` brightness, kept patches outlined.
        title: figure title.
    Returns a matplotlib Figure (close it after saving).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h, w = image.shape[:2]
    panels = 1 + len(levels)
    fig, axes = plt.subplots(1, panels, figsize=(min(6.0, 3.0 * w / h + 0.6) * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    _image_axis(ax, image, f"detections (score >= threshold): {len(scores)}")
    _outline(ax, boxes, "lime", 1.2)
    for (x0, y0, _, _), lab, sco in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        name = class_names[lab] if 0 <= lab < len(class_names) else f"class {lab}"
        ax.text(x0, y0, f"{name} {sco:.2f}", fontsize=6, color="black", va="bottom",
                bbox=dict(facecolor="lime", edgecolor="none", pad=0.5, alpha=0.8))
    _legend(ax, [("detection: class score", "none", "lime")])
    for ax, (name, rects, ratio) in zip(axes[0, 1:], levels):
        kept = rects_mask(rects, (h, w)).numpy()[..., None]
        shown = (image.astype(np.float32) * np.where(kept, 1.0, dim)).astype(np.uint8)
        _image_axis(ax, shown, f"{name}: kept {len(rects)} patches (keep ratio {ratio:.2f})")
        _outline(ax, rects, "cyan", 0.6)
        _legend(ax, [("kept patch", "none", "cyan"), (f"pruned (dimmed to {dim:.0%})", "0.3", "none")])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mask_panels_figure(image, gt_boxes: Tensor, target, prob, kept_rects: Tensor, title: str = ""):
    """The DSET TensorBoard picture: three titled panels over the input image with a shared colour bar.

    Args:
        image: float numpy [H, W, 3] in [0, 1] (the network input).
        gt_boxes: [n, 4] xyxy pixels of image (drawn on every panel).
        target, prob: float numpy [H, W] in [0, 1]: the CASS target mask and the predicted keep
            probability, upsampled to the image (see patch_map_to_image).
        kept_rects: [m, 4] xyxy pixels of the kept top-K patches (outlined on the third panel, the rest dimmed).
    Returns a matplotlib Figure.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(3.0 * w / h * 3 + 1.0, 3.4), squeeze=False, layout="constrained")
    heat = None
    for ax, panel, values in ((axes[0, 0], "target mask (CASS)", target),
                              (axes[0, 1], "predicted keep probability", prob)):
        ax.imshow(image)
        heat = ax.imshow(values, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6)
        ax.set_title(panel, fontsize=9)
        ax.set_axis_off()
        _outline(ax, gt_boxes, "lime", 1.0)
    kept = rects_mask(kept_rects, (h, w)).numpy()[..., None]
    _image_axis(axes[0, 2], image * np.where(kept, 1.0, 0.35), f"kept top-K: {len(kept_rects)} patches")
    _outline(axes[0, 2], kept_rects, "cyan", 0.6)
    _outline(axes[0, 2], gt_boxes, "lime", 1.0)
    _legend(axes[0, 2], [("GT box", "none", "lime"), ("kept patch", "none", "cyan"), ("pruned", "0.3", "none")])
    fig.colorbar(heat, ax=axes[0, 1], fraction=0.05, pad=0.02, label="target / keep probability")
    fig.suptitle(title, fontsize=10)
    return fig


def figure_to_array(fig) -> "np.ndarray":
    """Render a matplotlib Figure to a uint8 numpy [H, W, 3] array and close it."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
