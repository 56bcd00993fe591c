"""Training / evaluation transforms: thin, registered wrappers around torchvision.transforms.v2.

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8 [3, H, W] from
:class:`~src.data.coco_dataset.CocoDetection`), ``target`` a dict whose ``boxes`` is a
``tv_tensors.BoundingBoxes`` (XYXY, absolute pixels) and whose ``labels`` / ``area`` / ``iscrowd``
hold one entry per box. torchvision does all the box maths (flip, resize, crop, zoom-out); this
module only fixes explicit constructor arguments, adds the ``p`` switch RT-DETR puts on
``RandomIoUCrop`` and the epoch policy of :class:`Compose`.

The RT-DETR training pipeline is::

    RandomPhotometricDistort -> RandomZoomOut -> RandomIoUCrop -> SanitizeBoundingBoxes
    -> RandomHorizontalFlip -> Resize -> SanitizeBoundingBoxes -> ToDtype

Its output is a float image [3, h, w] in [0, 1] (RT-DETR uses no mean/std normalisation) and boxes
still absolute XYXY in the resized image; the collate function normalises them.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import PIL.Image
import torch
from torch import nn
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from src.core.registry import build, get, register

logger = logging.getLogger(__name__)

# Target fields that hold one entry per box and must be filtered together with the boxes.
PER_BOX_FIELDS = ("labels", "area", "iscrowd")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "uint8": torch.uint8}


def _pair(value: Sequence[float], name: str, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where}.{name} must be a [low, high] pair, got {value!r}")
    return (float(value[0]), float(value[1]))


def _parse_dtype(dtype: str, where: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"{where}.dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def per_box_target_fields(inputs: Any) -> tuple:
    """``labels_getter`` for SanitizeBoundingBoxes: the per-box tensors of the target dict.

    ``inputs`` is the sample ``(image, target)``; returns the target's ``labels``, ``area`` and
    ``iscrowd`` tensors (those present) so they are dropped together with invalid boxes.
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    if not isinstance(target, dict):
        raise TypeError("SanitizeBoundingBoxes expects a sample (image, target dict), "
                        f"got {type(inputs).__name__}")
    return tuple(target[k] for k in PER_BOX_FIELDS if isinstance(target.get(k), torch.Tensor))


@register()
class RandomPhotometricDistort(T.RandomPhotometricDistort):
    """Random brightness / contrast / saturation / hue / channel-order jitter (image only).

    A uint8 RGB ``tv_tensors.Image`` is jittered through PIL and converted back: torchvision's
    PIL kernels are 20-50x faster on CPU than its tensor kernels (hue above all), and the
    data loader runs on CPU.
    """

    def __init__(self, p: float = 0.5, brightness: Sequence[float] = (0.875, 1.125),
                 contrast: Sequence[float] = (0.5, 1.5), saturation: Sequence[float] = (0.5, 1.5),
                 hue: Sequence[float] = (-0.05, 0.05)):
        w = "RandomPhotometricDistort"
        super().__init__(brightness=_pair(brightness, "brightness", w), contrast=_pair(contrast, "contrast", w),
                         saturation=_pair(saturation, "saturation", w), hue=_pair(hue, "hue", w), p=p)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8 and inpt.shape[-3] == 3:
            out = super().transform(F.to_pil_image(inpt.as_subclass(torch.Tensor)), params)
            return tv_tensors.Image(F.pil_to_tensor(out))
        return super().transform(inpt, params)


@register()
class RandomZoomOut(T.RandomZoomOut):
    """With probability ``p`` place the image on a canvas ``side_range`` times larger, filled with ``fill``."""

    def __init__(self, fill: float = 0, side_range: Sequence[float] = (1.0, 4.0), p: float = 0.5):
        super().__init__(fill=fill, side_range=_pair(side_range, "side_range", "RandomZoomOut"), p=p)


@register()
class RandomIoUCrop(T.RandomIoUCrop):
    """SSD-style IoU crop applied with probability ``p`` (torchvision's version has no ``p``).

    Boxes whose centre leaves the crop are zeroed by torchvision: follow with SanitizeBoundingBoxes.
    """

    def __init__(self, p: float = 0.8, min_scale: float = 0.3, max_scale: float = 1.0,
                 min_aspect_ratio: float = 0.5, max_aspect_ratio: float = 2.0,
                 sampler_options: Optional[List[float]] = None, trials: int = 40):
        super().__init__(min_scale=min_scale, max_scale=max_scale, min_aspect_ratio=min_aspect_ratio,
                         max_aspect_ratio=max_aspect_ratio, sampler_options=sampler_options, trials=trials)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomIoUCrop.p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(1) >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


@register()
class SanitizeBoundingBoxes(T.SanitizeBoundingBoxes):
    """Drop boxes with a side < ``min_size`` or area < ``min_area`` (pixels) and their labels/area/iscrowd."""

    def __init__(self, min_size: float = 1, min_area: float = 1):
        super().__init__(min_size=min_size, min_area=min_area, labels_getter=per_box_target_fields)


@register()
class RandomHorizontalFlip(T.RandomHorizontalFlip):
    """Mirror image and boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)


@register()
class Resize(T.Resize):
    """Resize to exactly ``size = [height, width]`` (non-square allowed, e.g. [736, 1280]); boxes follow.

    In a YAML config leave ``size`` out: the top-level ``input_size`` fills it (src/core/input_size.py)."""

    def __init__(self, size: Optional[Sequence[int]] = None, interpolation: str = "bilinear",
                 antialias: bool = True):
        if size is None:
            raise ValueError("Resize needs size [height, width]: set the top-level input_size key (it fills every "
                             "train/val Resize) or give size")
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and s > 0 for s in size)):
            raise ValueError(f"Resize.size must be [height, width] of positive ints, got {size!r}")
        super().__init__(size=list(size), interpolation=T.InterpolationMode(interpolation), antialias=antialias)


@register()
class ToDtype(T.ToDtype):
    """Convert the image (only) to ``dtype``; ``scale=True`` maps uint8 [0, 255] to [0, 1]."""

    def __init__(self, dtype: str = "float32", scale: bool = True):
        super().__init__(dtype=_parse_dtype(dtype, "ToDtype"), scale=scale)


@register()
class ConvertPILImage(T.Transform):
    """PIL image or uint8 ``tv_tensors.Image`` -> ``tv_tensors.Image`` of ``dtype`` (RT-DETR's name).

    ``scale=True`` divides by 255 for integer inputs. Boxes and other target fields pass through.
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image)

    def __init__(self, dtype: str = "float32", scale: bool = True):
        super().__init__()
        self.dtype = _parse_dtype(dtype, "ConvertPILImage")
        self.scale = scale

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, scale={self.scale}"

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            inpt = tv_tensors.Image(F.pil_to_tensor(inpt))
        return F.to_dtype(inpt, dtype=self.dtype, scale=self.scale)


@register()
class Normalize(T.Normalize):
    """Per-channel ``(x - mean) / std`` on a float image. Not in the RT-DETR default pipeline."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Normalize needs 3 means and 3 positive stds, got mean={mean!r}, std={std!r}")
        super().__init__(mean=[float(m) for m in mean], std=[float(s) for s in std])


_POLICY_KEYS = {"name", "epoch", "ops"}


def _validate_policy(policy: Optional[dict], op_names: List[str]) -> Optional[dict]:
    """Check a ``{name: stop_epoch, epoch: N, ops: [...]}`` policy; returns a normalised copy or None."""
    if policy is None:
        return None
    where = "transforms.policy"
    if not isinstance(policy, dict):
        raise ValueError(f"{where} must be a mapping {{name: stop_epoch, epoch: N, ops: [...]}}, got {policy!r}")
    unknown = sorted(set(policy) - _POLICY_KEYS)
    missing = sorted(_POLICY_KEYS - set(policy))
    if unknown or missing:
        raise KeyError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}; "
                       f"valid keys: {sorted(_POLICY_KEYS)}")
    if policy["name"] != "stop_epoch":
        raise ValueError(f"{where}.name={policy['name']!r} is not supported; the only policy is 'stop_epoch'")
    epoch = policy["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{where}.epoch must be a non-negative int, got {epoch!r}")
    ops = policy["ops"]
    if not isinstance(ops, (list, tuple)) or not all(isinstance(o, str) for o in ops):
        raise ValueError(f"{where}.ops must be a list of transform names, got {ops!r}")
    for name in ops:
        get(name)  # KeyError listing the registered names when misspelt
        if name not in op_names:
            logger.warning("%s.ops names %s, which is not in transforms.ops (%s); it has no effect",
                           where, name, ", ".join(op_names))
    return {"name": "stop_epoch", "epoch": epoch, "ops": list(ops)}


@register()
class Compose(nn.Module):
    """Apply ``ops`` in order; ``policy`` switches named ops off from an epoch on.

    Args:
        ops: list of ``{type: Name, **kwargs}`` dicts (built with the registry) or transform modules.
        policy: ``None`` or ``{name: 'stop_epoch', epoch: N, ops: [names]}``: from epoch N on
            (``set_epoch(N)``) the named ops are skipped (RT-DETR turns the heavy augmentations
            off for the last epochs). The epoch starts at 0.
    """

    def __init__(self, ops: List[dict], policy: Optional[dict] = None):
        super().__init__()
        if not isinstance(ops, (list, tuple)):
            raise ValueError(f"transforms.ops must be a list of {{type: Name, ...}} mappings, got {ops!r}")
        built = []
        for i, op in enumerate(ops):
            built.append(op if isinstance(op, nn.Module) else build(op, where=f"transforms.ops[{i}]"))
        self.transforms = nn.ModuleList(built)
        self.policy = _validate_policy(policy, [type(t).__name__ for t in built])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def is_active(self, transform: nn.Module) -> bool:
        """Whether ``transform`` runs at the current epoch under the policy."""
        if self.policy is None or self.epoch < self.policy["epoch"]:
            return True
        return type(transform).__name__ not in self.policy["ops"]

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        for transform in self.transforms:
            if self.is_active(transform):
                sample = transform(sample)
        return sample

    def extra_repr(self) -> str:
        return f"policy={self.policy}, epoch={self.epoch}"
