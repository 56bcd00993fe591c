"""PResNet: the ResNet-vd family used by RT-DETR (Paddle-style key names, e.g. ``res_layers.1.blocks.0``).

Variant ``d`` (the RT-DETR default): a deep stem of three 3x3 conv-norm-act layers
(``conv1.conv1_1`` stride 2: 3 -> 32, ``conv1_2``: 32 -> 32, ``conv1_3``: 32 -> 64), a 3x3/2 max pool,
then four stages. The first block of stages 2-4 downsamples with a stride-2 main branch and an
``AvgPool2d(2, 2, ceil_mode=True)`` + 1x1 conv-norm shortcut (keys ``short.conv.conv.weight``); the
first block of stage 1 has a 1x1 conv-norm shortcut (keys ``short.conv.weight``).

Output strides of stages 0..3: 4, 8, 16, 32; channels 64/128/256/512 (BasicBlock, depth 18/34) or
256/512/1024/2048 (BottleNeck, depth 50/101).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
from torch import nn

from src.core.registry import register
from src.nn.backbone.common import ConvNormLayer, freeze_batch_norm2d, get_activation
from src.nn.pooling import stem_max_pool

__all__ = ["PResNet"]

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
STAGE_WIDTHS = [64, 128, 256, 512]
STAGE_STRIDES = [4, 8, 16, 32]
VARIANTS = ("a", "b", "c", "d")


def _shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Projection shortcut of the first block of a stage: avg-pool + 1x1 conv for a downsampling
    variant-d block, else a strided 1x1 conv-norm."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers plus shortcut, then activation. x [B, ch_in, H, W] -> [B, ch_out, H/s, W/s]."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str = "relu",
                 variant: str = "d"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        return self.act(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) conv-norm layers plus shortcut, then activation. Variant 'a'
    strides the first 1x1 conv, the others stride the 3x3 conv."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str = "relu",
                 variant: str = "d"):
        super().__init__()
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return self.act(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    """One stage: ``count`` blocks; the first has a projection shortcut and stride 2 (stride 1 in
    stage 0, which follows the stem's max pool)."""

    def __init__(self, block: type, ch_in: int, ch_out: int, count: int, stage_idx: int, act: str,
                 variant: str):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage_idx > 0 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=i > 0, act=act, variant=variant))
            ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@register()
class PResNet(nn.Module):
    """ResNet-vd backbone returning the feature maps of the stages in ``return_idx``.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (BottleNeck).
        variant: 'a' | 'b' | 'c' | 'd'; 'c'/'d' use the deep 3-conv stem, 'd' the avg-pool shortcut.
        num_stages: number of residual stages built (1..4).
        return_idx: strictly increasing stage indices (0..num_stages-1) whose outputs are returned.
        act: activation of the conv-norm layers and blocks.
        freeze_at: -1 trains everything; k >= 0 sets requires_grad=False on the stem and on stages
            0..k-1 (0 = stem only). BatchNorm running statistics of frozen stages still update in
            train mode unless ``freeze_norm`` is set (as in the official code).
        freeze_norm: replace every BatchNorm2d by FrozenBatchNorm2d (same state-dict keys).
        pretrained: False, or the path of a local state-dict file (keys as in this module, no prefix),
            loaded strictly with ``torch.load(weights_only=True)``. Nothing is ever downloaded.

    forward(x [B, 3, H, W]) -> list of [B, out_channels[i], H / out_strides[i], W / out_strides[i]]
    (sizes rounded up for H, W not divisible by the stride).
    """

    def __init__(self, depth: int = 18, variant: str = "d", num_stages: int = 4,
                 return_idx: Sequence[int] = (1, 2, 3), act: str = "relu", freeze_at: int = -1,
                 freeze_norm: bool = False, pretrained: bool | str = False):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"PResNet: depth={depth} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}")
        if variant not in VARIANTS:
            raise ValueError(f"PResNet: variant={variant!r} is not one of {VARIANTS}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"PResNet: num_stages={num_stages} must be in 1..4")
        bad = [i for i in return_idx if not 0 <= i < num_stages]
        if bad or len(return_idx) == 0 or list(return_idx) != sorted(set(return_idx)):
            raise ValueError(f"PResNet: return_idx={list(return_idx)} must be a non-empty, strictly "
                             f"increasing list of stage indices in 0..{num_stages - 1}")
        if not -1 <= freeze_at <= num_stages:
            raise ValueError(f"PResNet: freeze_at={freeze_at} must be -1 (nothing frozen) or in 0..{num_stages}")

        stem_width = 64
        if variant in ("c", "d"):
            stem = [(3, stem_width // 2, 3, 2, "conv1_1"),
                    (stem_width // 2, stem_width // 2, 3, 1, "conv1_2"),
                    (stem_width // 2, stem_width, 3, 1, "conv1_3")]
        else:
            stem = [(3, stem_width, 7, 2, "conv1_1")]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(cin, cout, k, s, act=act)) for cin, cout, k, s, name in stem))

        block = BottleNeck if depth >= 50 else BasicBlock
        stage_channels = [w * block.expansion for w in STAGE_WIDTHS]
        self.res_layers = nn.ModuleList()
        ch_in = stem_width
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, STAGE_WIDTHS[i], BLOCKS_PER_STAGE[depth][i], i,
                                          act=act, variant=variant))
            ch_in = stage_channels[i]

        self.return_idx = list(return_idx)
        self.out_channels = [stage_channels[i] for i in self.return_idx]
        self.out_strides = [STAGE_STRIDES[i] for i in self.return_idx]

        if freeze_at >= 0:
            self.conv1.requires_grad_(False)
            for stage in self.res_layers[:freeze_at]:
                stage.requires_grad_(False)
        if freeze_norm:
            freeze_batch_norm2d(self)
        if pretrained:
            self.load_local_state_dict(pretrained)

    def load_local_state_dict(self, path) -> None:
        """Strictly load a state dict saved with ``torch.save(backbone.state_dict(), path)``."""
        if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
            raise ValueError(f"PResNet: pretrained={path!r}; give False or the path of a local state-dict "
                             f"file (weights are never downloaded)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"PResNet: pretrained weights file {path!r} does not exist; fix the "
                                    f"backbone 'pretrained' path or set it to false") from e
        if not isinstance(state, dict):
            raise ValueError(f"PResNet: {path!r} holds a {type(state).__name__}, expected a state dict "
                             f"(save it with torch.save(backbone.state_dict(), path))")
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(f"PResNet: {path!r} does not match this backbone: missing keys "
                           f"{result.missing_keys[:5]} ({len(result.missing_keys)} in all), unexpected keys "
                           f"{result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all); "
                           f"strip any 'backbone.' prefix and check depth/variant")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = stem_max_pool(self.conv1(x))  # F.max_pool2d(x, 3, 2, 1), faster on a CPU in inference
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
