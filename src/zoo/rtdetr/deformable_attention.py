"""Multi-scale deformable attention (Deformable DETR, RT-DETRv2 variant with per-level point counts).

``multi_scale_deformable_attention_core`` is the pure sampling-and-weighting maths (``sample_value_levels`` the
same on one value map per level);
``MSDeformableAttention`` is the module with the projections (state-dict keys as in RT-DETRv2:
``num_points_scale`` buffer, ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``).

Notation: B batch, Lq queries, Lv = sum_l h_l * w_l value tokens, M heads, D channels per head,
L levels, P = sum(num_points_list) sampling points per head (level-major: the first
``num_points_list[0]`` points sample level 0, and so on).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from src.misc.transfer import tensor_on
from src.nn.tracing import tracing_graph

CROSS_ATTN_METHODS = ("default", "discrete")


def multi_scale_deformable_attention_core(value: Tensor,
                                          spatial_shapes: Sequence[Tuple[int, int]],
                                          sampling_locations: Tensor,
                                          attention_weights: Tensor,
                                          num_points_list: Sequence[int],
                                          method: str = "default") -> Tensor:
    """Sample every level's value map at the given locations and take the attention-weighted sum.

    Args:
        value: [B, Lv, M, D], the levels' tokens concatenated in row-major (y, x) order.
        spatial_shapes: L pairs (h_l, w_l) of Python ints, sum h_l * w_l == Lv.
        sampling_locations: [B, Lq, M, P, 2], (x, y) in [0, 1] of the level's map; (0, 0) is the
            top-left corner of the top-left cell, (1, 1) the bottom-right corner of the last cell.
        attention_weights: [B, Lq, M, P], already normalised (softmax over P).
        num_points_list: L ints, points per level, sum == P.
        method: 'default' bilinear sampling (grid_sample, zero padding, align_corners=False);
            'discrete' takes the nearest cell (index floor(x * w + 0.5), clamped into the map).

    Returns:
        [B, Lq, M * D] (head-major channels).
    """
    batch, _, num_heads, head_dim = value.shape
    level_sizes = [h * w for h, w in spatial_shapes]
    if sum(level_sizes) != value.shape[1]:
        raise ValueError(f"deformable attention: spatial_shapes {list(spatial_shapes)} cover {sum(level_sizes)} "
                         f"tokens but value has {value.shape[1]}; pass the (h, w) of every level of value")
    # [B, Lv, M, D] -> [B*M, D, Lv], split per level into maps [B*M, D, h_l, w_l]
    value_levels = [v.reshape(batch * num_heads, head_dim, h, w) for (h, w), v in
                    zip(spatial_shapes, value.permute(0, 2, 3, 1).flatten(0, 1).split(level_sizes, dim=-1))]
    return sample_value_levels(value_levels, sampling_locations, attention_weights, num_points_list, method)


def sample_value_levels(value_levels: Sequence[Tensor],
                        sampling_locations: Tensor,
                        attention_weights: Tensor,
                        num_points_list: Sequence[int],
                        method: str = "default") -> Tensor:
    """``multi_scale_deformable_attention_core`` on value already laid out as one map per level.

    Args:
        value_levels: L maps [B*M, D, h_l, w_l] (batch-major, then head).
        sampling_locations, attention_weights, num_points_list, method: as in
            ``multi_scale_deformable_attention_core``.

    Returns:
        [B, Lq, M * D] (head-major channels).
    """
    batch, num_queries, num_heads = sampling_locations.shape[:3]
    head_dim = value_levels[0].shape[1]
    if len(value_levels) != len(num_points_list):
        raise ValueError(f"deformable attention: {len(value_levels)} value levels but num_points_list "
                         f"{list(num_points_list)} lists {len(num_points_list)}; give one point count per level")
    if sum(num_points_list) != sampling_locations.shape[3]:
        raise ValueError(f"deformable attention: num_points_list {list(num_points_list)} sums to "
                         f"{sum(num_points_list)} but sampling_locations has {sampling_locations.shape[3]} points")

    # [B, Lq, M, P, 2] -> [B*M, Lq, P, 2], split per level along the point axis
    locations = sampling_locations.permute(0, 2, 1, 3, 4).flatten(0, 1)
    location_levels = locations.split(list(num_points_list), dim=-2)

    # [B, Lq, M, P] -> [B*M, 1, Lq, P], split per level like the locations
    weights = attention_weights.permute(0, 2, 1, 3).reshape(batch * num_heads, 1, num_queries, -1)
    weight_levels = weights.split(list(num_points_list), dim=-1)

    output = None  # [B*M, D, Lq]: each level's weighted sum added in (no [B*M, D, Lq, P] concatenation)
    for value_l, loc_l, weight_l in zip(value_levels, location_levels, weight_levels):
        if method == "default":
            # grid_sample wants [-1, 1]; -> [B*M, D, Lq, P_l]
            sampled = F.grid_sample(value_l, 2 * loc_l - 1, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
        elif method == "discrete":
            sampled = _nearest_cell_sample(value_l, loc_l)
        else:
            raise ValueError(f"deformable attention: unknown method {method!r}; use one of {CROSS_ATTN_METHODS}")
        level = (sampled * weight_l).sum(-1)
        output = level if output is None else output + level
    return output.reshape(batch, num_heads * head_dim, num_queries).permute(0, 2, 1)


def _nearest_cell_sample(value_l: Tensor, loc_l: Tensor) -> Tensor:
    """Nearest-cell lookup: value_l [N, D, h, w], loc_l [N, Lq, P, 2] in [0, 1] -> [N, D, Lq, P]."""
    n, d, h, w = value_l.shape
    size = tensor_on([w, h], loc_l.device, loc_l.dtype)
    cell = torch.floor(loc_l * size + 0.5).long()
    x = cell[..., 0].clamp(0, w - 1)
    y = cell[..., 1].clamp(0, h - 1)
    index = (y * w + x).flatten(1)  # [N, Lq*P]
    out = value_l.flatten(2).gather(2, index.unsqueeze(1).expand(n, d, index.shape[1]))
    return out.reshape(n, d, *loc_l.shape[1:3])


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention with box reference points (RT-DETRv2).

    For a box reference (cx, cy, w, h) the sampling location of point k of level l is
    (cx, cy) + offset * (1 / num_points_l) * (w, h) * offset_scale.
    For a point reference (x, y) it is (x, y) + offset / (w_l, h_l) of the level's map.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int | List[int] = 4, method: str = "default", offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformableAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if method not in CROSS_ATTN_METHODS:
            raise ValueError(f"MSDeformableAttention: unknown method {method!r}; use one of {CROSS_ATTN_METHODS}")
        if isinstance(num_points, (list, tuple)):
            if len(num_points) != num_levels:
                raise ValueError(f"MSDeformableAttention: num_points {list(num_points)} must list one count per "
                                 f"level ({num_levels} levels), or be a single int")
            num_points_list = [int(n) for n in num_points]
        else:
            num_points_list = [int(num_points)] * num_levels

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = num_points_list
        self.method = method
        self.offset_scale = offset_scale
        self.head_dim = embed_dim // num_heads
        total_points = sum(num_points_list)

        # 1 / num_points_l for every point, level-major: [P]
        scale = [1.0 / n for n in num_points_list for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))

        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

        if method == "discrete":  # the nearest-cell lookup has no gradient w.r.t. the locations
            for p in self.sampling_offsets.parameters():
                p.requires_grad = False

    def _reset_parameters(self):
        # offsets start on a ring of directions, one per head, point k of a level at distance k
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # [M, 2]
        distance = torch.cat([torch.arange(1, n + 1) for n in self.num_points_list]).to(torch.float32)  # [P]
        grid = directions[:, None, :] * distance[None, :, None]  # [M, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def _per_point(self, reference: Tensor) -> Tensor:
        """[B, Lq, 1 or L, k] -> [B, Lq, 1, 1 or P, k] (a per-level reference repeated for its points)."""
        if reference.shape[2] not in (1, self.num_levels):
            raise ValueError(f"MSDeformableAttention: reference_points level axis is {reference.shape[2]}; "
                             f"expected 1 or num_levels={self.num_levels}")
        if reference.shape[2] == self.num_levels and self.num_levels > 1:
            repeats = tensor_on(self.num_points_list, reference.device)
            reference = reference.repeat_interleave(repeats, dim=2, output_size=sum(self.num_points_list))
        return reference.unsqueeze(2)

    def value_levels(self, value, value_spatial_shapes: Sequence[Tuple[int, int]],
                     value_mask: Optional[Tensor] = None) -> List[Tensor]:
        """The projected value of every level, as maps [B*M, D, h_l, w_l].

        Args:
            value: [B, Lv, C] tokens (levels concatenated, row-major), or the L levels' maps [B, C, h_l, w_l]
                (the same tokens laid out as maps).
            value_spatial_shapes: L pairs (h_l, w_l).
            value_mask: optional [B, Lv] bool, True for real (non-padding) tokens.

        ``value_proj`` runs on each level's map as ``W @ map[B, C, h*w] + b`` (one batched matmul with its bias):
        the output channels are head-major, so [B, M*D, h*w] is [B*M, D, h, w] without a copy, and maps need no
        transpose before the sampling (on tokens, the projection's output would have to be transposed for each
        layer). In PyTorch a matmul, not a 1x1 convolution: it runs at ``nn.Linear``'s precision (on CUDA a
        float32 conv would use TF32 under torch's default ``cudnn.allow_tf32``, a float32 matmul does not), and
        on a CPU it is faster than the convolution (7 against 12 ms for the three 640x640 levels). A channels-last
        map (the CPU deployment, ``deploy.inference_memory_format``) is a matrix of cells already: ``F.linear`` on
        them, and the sampling reads the result with D innermost (``_value_rows``; the same values, about 2 ms a
        decoder layer less at 640x640, batch 1, on the 2-core CPU). A traced graph (ONNX export) gets the 1x1
        ``Conv`` with its bias instead: the same maths, and onnxruntime runs it about 1.2 ms a decoder layer faster
        than ``MatMul`` + ``Add`` at 640x640 (its precision is the runtime's choice).
        """
        sizes = [h * w for h, w in value_spatial_shapes]
        if isinstance(value, Tensor):
            if sum(sizes) != value.shape[1]:
                raise ValueError(f"MSDeformableAttention: value_spatial_shapes {list(value_spatial_shapes)} cover "
                                 f"{sum(sizes)} tokens but value has {value.shape[1]}")
            maps = [v.reshape(v.shape[0], v.shape[1], h, w) for (h, w), v in
                    zip(value_spatial_shapes, value.transpose(1, 2).split(sizes, dim=-1))]
        else:
            maps = list(value)
            got = [tuple(m.shape[-2:]) for m in maps]
            if got != [tuple(hw) for hw in value_spatial_shapes]:
                raise ValueError(f"MSDeformableAttention: value maps of sizes {got} do not match "
                                 f"value_spatial_shapes {list(value_spatial_shapes)}")
        masks = value_mask.split(sizes, dim=1) if value_mask is not None else [None] * len(maps)
        weight, bias = self.value_proj.weight, self.value_proj.bias                  # [M*D, C], [M*D]
        graph = tracing_graph()
        levels = []
        for (h, w), map_l, mask_l in zip(value_spatial_shapes, maps, masks):
            b = map_l.shape[0]
            if not graph and map_l.permute(0, 2, 3, 1).is_contiguous():  # a channels-last map: its cells are rows
                levels.append(self._value_rows(map_l.permute(0, 2, 3, 1), mask_l))
                continue
            if graph:
                v = F.conv2d(map_l, weight[:, :, None, None], bias).flatten(2)             # [B, M*D, h*w]
            else:
                v = torch.baddbmm(bias.unsqueeze(-1), weight.expand(b, -1, -1), map_l.flatten(2))
            if mask_l is not None:
                v = v * mask_l.to(v.dtype).unsqueeze(1)
            levels.append(v.reshape(b * self.num_heads, self.head_dim, h, w))
        return levels

    def _value_rows(self, cells: Tensor, mask: Optional[Tensor]) -> Tensor:
        """``value_proj`` of a channels-last level, cells [B, h, w, C] (contiguous) -> [B*M, D, h, w] with D the
        innermost (stride 1) axis, which ``grid_sample`` reads faster than channels-first maps (each sample
        takes D neighbouring values). A view at B = 1; at B > 1 one copy puts each head's map together."""
        b, h, w, _ = cells.shape
        v = F.linear(cells, self.value_proj.weight, self.value_proj.bias)                  # [B, h, w, M*D]
        if mask is not None:
            v = v * mask.to(v.dtype).view(b, h, w, 1)
        v = v.view(b, h, w, self.num_heads, self.head_dim)
        if b == 1:
            return v.permute(0, 3, 4, 1, 2).reshape(self.num_heads, self.head_dim, h, w)
        return v.permute(0, 3, 1, 2, 4).contiguous().view(b * self.num_heads, h, w, self.head_dim).permute(0, 3, 1, 2)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                value_spatial_shapes: Sequence[Tuple[int, int]], value_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: [B, Lq, C].
            reference_points: [B, Lq, 1 or L, 4] boxes (cx, cy, w, h) in [0, 1], or [B, Lq, 1 or L, 2] points.
            value: [B, Lv, C] tokens, or the L levels' maps [B, C, h_l, w_l] (``value_levels``).
            value_spatial_shapes: L pairs (h_l, w_l).
            value_mask: optional [B, Lv] bool, True for real (non-padding) tokens.

        Returns:
            [B, Lq, C].
        """
        batch, num_queries = query.shape[:2]
        total_points = sum(self.num_points_list)

        levels = self.value_levels(value, value_spatial_shapes, value_mask)

        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, total_points, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, total_points)
        weights = F.softmax(weights, dim=-1)

        reference = self._per_point(reference_points)  # [B, Lq, 1, 1 or P, 2 or 4]
        if reference_points.shape[-1] == 4:
            scale = self.num_points_scale.to(query.dtype).unsqueeze(-1)  # [P, 1]
            locations = reference[..., :2] + offsets * scale * reference[..., 2:] * self.offset_scale
        elif reference_points.shape[-1] == 2:
            level_wh = tensor_on([[w, h] for h, w in value_spatial_shapes], query.device, query.dtype)
            repeats = tensor_on(self.num_points_list, query.device)
            normaliser = level_wh.repeat_interleave(repeats, dim=0, output_size=total_points)  # [P, 2]
            locations = reference + offsets / normaliser
        else:
            raise ValueError(f"MSDeformableAttention: reference_points last dim must be 2 (points) or 4 (boxes), "
                             f"got shape {tuple(reference_points.shape)}")

        output = sample_value_levels(levels, locations, weights, self.num_points_list, self.method)
        return self.output_proj(output)
