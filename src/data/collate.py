"""Batch collation: pad images to a common size and normalise boxes to that padded size."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from src.core.registry import register
from src.nn.box_ops import box_xyxy_to_cxcywh


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _parse_scales(scales: Optional[Sequence], where: str) -> Optional[List[Tuple[int, int]]]:
    """``[[h, w], ...]`` (an int means a square side) -> list of (h, w) tuples."""
    if scales is None:
        return None
    if not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"{where}.scales must be a non-empty list of [height, width] sizes or null, got {scales!r}")
    parsed = []
    for i, s in enumerate(scales):
        pair = (s, s) if isinstance(s, int) else s
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
            raise ValueError(f"{where}.scales[{i}] must be [height, width] (positive ints) or an int, got {s!r}")
        parsed.append((int(pair[0]), int(pair[1])))
    return parsed


@register()
class BatchImageCollateFunction:
    """``collate(batch) -> (images [B, 3, Hp, Wp], targets)`` for a list of ``(image, target)`` samples.

    Images [3, h_i, w_i] (float, from the transforms) are padded bottom/right with zeros to the batch
    maximum rounded up to ``size_divisibility``. With multi-scale on, one size (h, w) from
    ``scales`` is drawn per batch with the torch RNG; the batch, first padded to its common (unrounded)
    size, is resized to (h, w) with ``F.interpolate`` and then padded to a multiple of
    ``size_divisibility``. Multi-scale is off from epoch ``stop_epoch`` on (``set_epoch``).

    Each target keeps its keys; ``boxes`` (absolute XYXY pixels of the image) becomes a plain tensor
    [n, 4] of normalised (cx, cy, w, h) relative to the PADDED size (Wp, Hp); added: ``size`` =
    (w, h) of the image content before padding (after any multi-scale resize) and ``padded_size`` =
    (Wp, Hp), both int64 [2]. ``orig_size`` (w, h of the file) is kept from the dataset.
    """

    def __init__(self, scales: Optional[Sequence] = None, stop_epoch: Optional[int] = None,
                 size_divisibility: int = 32, interpolation: str = "bilinear"):
        self.scales = _parse_scales(scales, "collate_fn")
        self.stop_epoch = stop_epoch
        if not isinstance(size_divisibility, int) or size_divisibility < 1:
            raise ValueError(f"collate_fn.size_divisibility must be a positive int, got {size_divisibility!r}")
        self.size_divisibility = size_divisibility
        if interpolation not in ("nearest", "bilinear", "bicubic", "area"):
            raise ValueError(f"collate_fn.interpolation={interpolation!r}; use nearest, bilinear, bicubic or area")
        self.interpolation = interpolation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def multiscale_active(self) -> bool:
        return self.scales is not None and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def _draw_scale(self) -> Tuple[int, int]:
        return self.scales[int(torch.randint(len(self.scales), (1,)))]

    def __call__(self, batch: List[tuple]):
        images = [sample[0].as_subclass(torch.Tensor) for sample in batch]
        targets = [dict(sample[1]) for sample in batch]
        if not images:
            raise ValueError("collate_fn got an empty batch")
        sizes = torch.tensor([[img.shape[-1], img.shape[-2]] for img in images], dtype=torch.float64)  # [B, 2] (w, h)
        max_h = int(max(img.shape[-2] for img in images))
        max_w = int(max(img.shape[-1] for img in images))
        scale_xy = torch.ones(2, dtype=torch.float64)

        if self.multiscale_active:
            out_h, out_w = self._draw_scale()
            stacked = self._pad(images, max_h, max_w)
            kwargs = {} if self.interpolation in ("nearest", "area") else {"align_corners": False}
            stacked = F.interpolate(stacked, size=(out_h, out_w), mode=self.interpolation, **kwargs)
            scale_xy = torch.tensor([out_w / max_w, out_h / max_h], dtype=torch.float64)
            pad_h, pad_w = _round_up(out_h, self.size_divisibility), _round_up(out_w, self.size_divisibility)
            padded = stacked.new_zeros((len(images), stacked.shape[1], pad_h, pad_w))
            padded[:, :, :out_h, :out_w] = stacked
        else:
            pad_h, pad_w = _round_up(max_h, self.size_divisibility), _round_up(max_w, self.size_divisibility)
            padded = self._pad(images, pad_h, pad_w)

        content_sizes = torch.round(sizes * scale_xy).to(torch.int64)  # [B, 2]
        padded_size = torch.tensor([pad_w, pad_h], dtype=torch.int64)
        counts = [int(t["boxes"].shape[0]) for t in targets]
        boxes = torch.cat([t["boxes"].as_subclass(torch.Tensor).reshape(-1, 4).to(torch.float32)
                           for t in targets])  # [N, 4] absolute xyxy
        norm = (scale_xy / padded_size.to(torch.float64)).to(torch.float32).repeat(2)  # [4]: (sx/Wp, sy/Hp) x 2
        boxes = box_xyxy_to_cxcywh(boxes * norm)
        for t, b, size in zip(targets, boxes.split(counts), content_sizes):
            t["boxes"] = b
            t["size"] = size
            t["padded_size"] = padded_size.clone()
        return padded, targets

    @staticmethod
    def _pad(images: List[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Zero-pad each [C, h, w] image bottom/right into one [B, C, height, width] tensor."""
        first = images[0]
        out = first.new_zeros((len(images), first.shape[0], height, width))
        for i, img in enumerate(images):
            out[i, :, :img.shape[-2], :img.shape[-1]] = img
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scales={self.scales}, stop_epoch={self.stop_epoch}, "
                f"size_divisibility={self.size_divisibility}, interpolation={self.interpolation!r}, epoch={self.epoch})")
