"""RT-DETRv2 transformer decoder: query selection from the encoder memory, deformable decoder layers with
iterative box refinement, and contrastive denoising in training.

State-dict layout (keys and shapes) equals the official RT-DETRv2 ``decoder.*`` rows, so official
checkpoints load unchanged.

Outputs (boxes normalised cxcywh, logits before sigmoid):
  eval:     {'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4]} of layer ``eval_idx``.
  training: the last layer's pred_logits / pred_boxes and, with ``aux_loss``,
            'aux_outputs' (the other layers, first to second-to-last), 'enc_aux_outputs' (one dict: the
            selected encoder proposals), 'enc_meta' {'class_agnostic': bool}; with denoising also
            'dn_aux_outputs' (every layer, last included) and 'dn_meta' (see denoising.py).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import init

from src.core.registry import register
from src.nn.activation import get_activation
from src.misc.transfer import tensor_on
from src.nn.mlp import MLP
from src.zoo.rtdetr.box_ops import inverse_sigmoid
from src.zoo.rtdetr.deformable_attention import CROSS_ATTN_METHODS, MSDeformableAttention
from src.zoo.rtdetr.denoising import get_contrastive_denoising_training_group

__all__ = ["RTDETRTransformerv2", "TransformerDecoderLayer", "TransformerDecoder", "generate_anchors"]

QUERY_SELECT_METHODS = ("default", "one2many", "agnostic")
def bias_init_with_prob(prior_prob: float) -> float:
    """Bias whose sigmoid is ``prior_prob`` (focal-loss classifier init)."""
    return -math.log((1 - prior_prob) / prior_prob)


def generate_anchors(spatial_shapes: Sequence[Tuple[int, int]], eps: float = 1e-2, grid_size: float = 0.05,
                     dtype: torch.dtype = torch.float32, device=None) -> Tuple[Tensor, Tensor]:
    """Encoder anchor boxes, one per feature cell, in logit space.

    Cell (i, j) of level l (map h x w) has centre ((j + 0.5) / w, (i + 0.5) / h) and side
    grid_size * 2**l. An anchor is valid when all four cxcywh values lie in (eps, 1 - eps);
    invalid anchors are +inf.

    Args:
        spatial_shapes: L pairs (h_l, w_l).

    Returns:
        anchors [1, sum h_l w_l, 4] (inverse sigmoid of cxcywh, +inf where invalid),
        valid_mask [1, sum h_l w_l, 1] bool.
    """
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                        torch.arange(w, dtype=dtype, device=device), indexing="ij")
        centre = (torch.stack([grid_x, grid_y], -1) + 0.5) / tensor_on([w, h], device, dtype)
        side = torch.full_like(centre, grid_size * (2.0 ** level))
        anchors.append(torch.cat([centre, side], -1).reshape(1, h * w, 4))
    anchors = torch.cat(anchors, 1)
    valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid_mask, anchors, torch.full_like(anchors, math.inf))
    return anchors, valid_mask


class TransformerDecoderLayer(nn.Module):
    """Self-attention -> norm1, deformable cross-attention -> norm2, FFN (``forward_ffn``) -> norm3 (post-norm)."""

    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", n_levels: int = 4, n_points: int | List[int] = 4,
                 cross_attn_method: str = "default"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

        init.xavier_uniform_(self.linear1.weight)
        init.xavier_uniform_(self.linear2.weight)

    def forward_ffn(self, x: Tensor) -> Tensor:
        """Position-wise feed-forward: [B, N, d_model] -> [B, N, d_model] (the residual is added by forward)."""
        return self.linear2(self.dropout3(self.activation(self.linear1(x))))

    def forward(self, target: Tensor, reference_points: Tensor, memory: Tensor,
                memory_spatial_shapes: Sequence[Tuple[int, int]], attn_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, query_pos_embed: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            target: [B, N, d] query content; reference_points: [B, N, 1, 4] sigmoid-space boxes;
            memory: [B, Lv, d] tokens or the levels' maps [B, d, h_l, w_l] (as MSDeformableAttention takes
            its value); attn_mask: [N, N] bool, True = blocked; memory_mask: [B, Lv] bool, True = real;
            query_pos_embed: [B, N, d].
        Returns:
            [B, N, d].
        """
        q = k = target if query_pos_embed is None else target + query_pos_embed
        attended, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attended))

        cross_query = target if query_pos_embed is None else target + query_pos_embed
        attended = self.cross_attn(cross_query, reference_points, memory, memory_spatial_shapes, memory_mask)
        target = self.norm2(target + self.dropout2(attended))

        target = self.norm3(target + self.dropout4(self.forward_ffn(target)))
        return target


class TransformerDecoder(nn.Module):
    """Stack of decoder layers with iterative box refinement (each layer refines the previous boxes)."""

    def __init__(self, hidden_dim: int, decoder_layer: TransformerDecoderLayer, num_layers: int, eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        if not 0 <= self.eval_idx < num_layers:
            raise ValueError(f"TransformerDecoder: eval_idx {eval_idx} is outside the {num_layers} layers")

    def forward(self, target: Tensor, ref_points_unact: Tensor, memory: Tensor | List[Tensor],
                memory_spatial_shapes: Sequence[Tuple[int, int]], bbox_head: nn.ModuleList,
                score_head: nn.ModuleList, query_pos_head: nn.Module, attn_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            target: [B, N, d] initial content; ref_points_unact: [B, N, 4] initial boxes in logit space;
            memory: [B, Lv, d] tokens or the levels' maps [B, d, h_l, w_l] (faster: no transposes).
        Returns:
            boxes [K, B, N, 4] (sigmoid space), logits [K, B, N, C]; K = num_layers in training,
            1 (layer eval_idx) in eval.
        """
        out_boxes, out_logits = [], []
        ref_detached = torch.sigmoid(ref_points_unact)
        ref_boxes = ref_detached  # boxes of the previous layer, with gradient (training outputs use them)
        output = target
        for i, layer in enumerate(self.layers):
            query_pos_embed = query_pos_head(ref_detached)
            output = layer(output, ref_detached.unsqueeze(2), memory, memory_spatial_shapes,
                           attn_mask, memory_mask, query_pos_embed)
            delta = bbox_head[i](output)
            refined = torch.sigmoid(delta + inverse_sigmoid(ref_detached))

            if self.training:
                out_logits.append(score_head[i](output))
                # layer 0 refines the (detached) encoder proposals; later layers keep the gradient
                # path through the previous layer's boxes for the loss (look-forward-twice)
                out_boxes.append(refined if i == 0 else torch.sigmoid(delta + inverse_sigmoid(ref_boxes)))
            elif i == self.eval_idx:
                out_logits.append(score_head[i](output))
                out_boxes.append(refined)
                break

            ref_boxes = refined
            ref_detached = refined.detach()

        return torch.stack(out_boxes), torch.stack(out_logits)


@register()
class RTDETRTransformerv2(nn.Module):
    """RT-DETRv2 decoder. ``feats``: list of [B, feat_channels[l], H / feat_strides[l], W / feat_strides[l]]."""

    __share__ = ["num_classes", "eval_spatial_size"]

    def __init__(self,
                 num_classes: int = 80,
                 hidden_dim: int = 256,
                 num_queries: int = 300,
                 feat_channels: Sequence[int] = (512, 1024, 2048),
                 feat_strides: Sequence[int] = (8, 16, 32),
                 num_levels: int = 3,
                 num_points: int | List[int] = 4,
                 nhead: int = 8,
                 num_layers: int = 6,
                 dim_feedforward: int = 1024,
                 dropout: float = 0.0,
                 activation: str = "relu",
                 num_denoising: int = 100,
                 label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0,
                 learn_query_content: bool = False,
                 eval_spatial_size: Optional[Sequence[int]] = None,
                 eval_idx: int = -1,
                 eps: float = 1e-2,
                 aux_loss: bool = True,
                 cross_attn_method: str = "default",
                 query_select_method: str = "default"):
        super().__init__()
        feat_channels, feat_strides = list(feat_channels), list(feat_strides)
        if len(feat_channels) > num_levels:
            raise ValueError(f"RTDETRTransformerv2: {len(feat_channels)} feat_channels but num_levels={num_levels}; "
                             "num_levels must be >= the number of input feature maps")
        if len(feat_strides) != len(feat_channels):
            raise ValueError(f"RTDETRTransformerv2: feat_strides {feat_strides} and feat_channels {feat_channels} "
                             "must have the same length")
        if query_select_method not in QUERY_SELECT_METHODS:
            raise ValueError(f"RTDETRTransformerv2: unknown query_select_method {query_select_method!r}; "
                             f"use one of {QUERY_SELECT_METHODS}")
        if cross_attn_method not in CROSS_ATTN_METHODS:
            raise ValueError(f"RTDETRTransformerv2: unknown cross_attn_method {cross_attn_method!r}; "
                             f"use one of {CROSS_ATTN_METHODS}")
        while len(feat_strides) < num_levels:  # extra levels: stride-2 convs on the last map
            feat_strides.append(feat_strides[-1] * 2)

        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.aux_loss = aux_loss
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.learn_query_content = learn_query_content

        self.num_input_levels = len(feat_channels)
        self.input_proj = self._build_input_proj(feat_channels)
        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels,
                                        num_points, cross_attn_method=cross_attn_method)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_layers, eval_idx)
        self.ffn_activation = activation
        self.build_decoder_extras()  # here, so a subclass's modules keep their place in the init order

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            init.normal_(self.denoising_class_embed.weight[:-1])
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)

        self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)),
                                                     ("norm", nn.LayerNorm(hidden_dim))]))
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)

        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)])
        self.dec_bbox_head = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers)])

        if self.eval_spatial_size:
            anchors, valid_mask = generate_anchors(self._eval_spatial_shapes(), eps=eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

        self._reset_parameters()

    # ---------------------------------------------------------------- construction
    def build_decoder_extras(self):
        """Called in ``__init__`` right after the decoder layers are built: a subclass adds or swaps modules of
        the layers here (e.g. mixture-of-experts FFNs); the plain decoder adds none."""

    def _build_input_proj(self, feat_channels: List[int]) -> nn.ModuleList:
        """1x1 conv + BN per input level; extra levels are 3x3 stride-2 conv + BN on the previous one."""
        projections = nn.ModuleList(
            nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, self.hidden_dim, 1, bias=False)),
                                       ("norm", nn.BatchNorm2d(self.hidden_dim))]))
            for c in feat_channels)
        in_channels = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            projections.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_channels, self.hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", nn.BatchNorm2d(self.hidden_dim))])))
            in_channels = self.hidden_dim
        return projections

    def _reset_parameters(self):
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for score_head, bbox_head in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(score_head.bias, bias)
            init.constant_(bbox_head.layers[-1].weight, 0)
            init.constant_(bbox_head.layers[-1].bias, 0)
        init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learn_query_content:
            init.xavier_uniform_(self.tgt_embed.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for projection in self.input_proj:
            init.xavier_uniform_(projection.conv.weight)

    def _eval_spatial_shapes(self) -> List[Tuple[int, int]]:
        eval_h, eval_w = self.eval_spatial_size
        return [(int(eval_h / s), int(eval_w / s)) for s in self.feat_strides]

    # ---------------------------------------------------------------- forward pieces
    def _flatten_features(self, feats: List[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]], List[Tensor]]:
        """Project and flatten: feats -> memory [B, sum h_l w_l, d], spatial shapes [(h_l, w_l)], and the
        projected maps [B, d, h_l, w_l] themselves (the same tokens; the cross-attention reads its value from
        them without transposes)."""
        if len(feats) != self.num_input_levels:
            raise ValueError(f"RTDETRTransformerv2: got {len(feats)} feature maps, expected {self.num_input_levels} "
                             "(one per feat_channels entry)")
        projected = [proj(feat) for proj, feat in zip(self.input_proj, feats)]
        for level in range(len(feats), self.num_levels):
            source = feats[-1] if level == len(feats) else projected[-1]
            projected.append(self.input_proj[level](source))
        spatial_shapes = [(int(p.shape[2]), int(p.shape[3])) for p in projected]
        memory = torch.cat([p.flatten(2).permute(0, 2, 1) for p in projected], 1)
        return memory, spatial_shapes, projected

    def _anchors_for(self, spatial_shapes: List[Tuple[int, int]], memory: Tensor) -> Tuple[Tensor, Tensor]:
        """The stored anchors when the shapes are the eval ones, else anchors computed for these shapes."""
        if self.eval_spatial_size and spatial_shapes == self._eval_spatial_shapes():
            return self.anchors, self.valid_mask
        return generate_anchors(spatial_shapes, eps=self.eps, device=memory.device)

    def _select_topk(self, logits: Tensor, topk: int) -> Tensor:
        """Indices [B, k] of the top-k encoder proposals by their scores logits [B, L, C']."""
        if topk > logits.shape[1] and self.query_select_method != "one2many":
            raise ValueError(f"RTDETRTransformerv2: num_queries={topk} exceeds the {logits.shape[1]} encoder tokens; "
                             "use a larger input or fewer queries")
        if self.query_select_method == "default":
            return torch.topk(logits.max(-1).values, topk, dim=-1).indices
        if self.query_select_method == "one2many":
            return torch.topk(logits.flatten(1), topk, dim=-1).indices // self.num_classes
        return torch.topk(logits.squeeze(-1), topk, dim=-1).indices  # agnostic

    def _decoder_input(self, memory: Tensor, spatial_shapes: List[Tuple[int, int]],
                       dn_content: Optional[Tensor], dn_ref_unact: Optional[Tensor]):
        """Encoder proposals -> (content [B, N, d], reference boxes logit-space [B, N, 4], enc boxes, enc logits).

        The box head runs on the selected proposals only (the selection uses the scores alone; a row's boxes do
        not depend on the other rows): the same boxes as on every token, without the work on the L - k others.
        """
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory)
        memory = valid_mask.to(memory.dtype) * memory
        # the heads on [B*L, d] rows: a graph export then has one Gemm with its bias per linear layer (on
        # [B, L, d] it has MatMul + a separate Add over all L tokens); the same maths
        # (the batch is inferred, -1: a traced graph then keeps it dynamic)
        num_tokens = memory.shape[1]
        output_memory = self.enc_output(memory.flatten(0, 1))
        enc_logits = self.enc_score_head(output_memory)
        enc_logits = enc_logits.reshape(-1, num_tokens, enc_logits.shape[-1])           # [B, L, C']
        output_memory = output_memory.reshape(-1, num_tokens, output_memory.shape[-1])  # [B, L, d]
        index = self._select_topk(enc_logits, self.num_queries)                     # [B, k]

        def gather(x: Tensor) -> Tensor:  # [B, L, c] -> [B, k, c]
            return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        topk_memory, topk_logits = gather(output_memory), gather(enc_logits)
        # only the anchors [1, L, 4] are expanded to the batch (not the [B, L, d] memory: a copy in a graph)
        topk_coords_unact = self.enc_bbox_head(topk_memory) + gather(anchors.expand(index.shape[0], -1, -1))
        enc_boxes = torch.sigmoid(topk_coords_unact) if self.training else None

        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            content = topk_memory.detach()
        ref_unact = topk_coords_unact.detach()
        if dn_ref_unact is not None:
            ref_unact = torch.cat([dn_ref_unact, ref_unact], 1)
            content = torch.cat([dn_content, content], 1)
        return content, ref_unact, enc_boxes, topk_logits

    @staticmethod
    def _pack(logits, boxes) -> List[Dict[str, Tensor]]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits, boxes)]

    # ---------------------------------------------------------------- forward
    def forward(self, feats: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None) -> Dict:
        """feats: list of [B, C_l, H_l, W_l]; targets (training, for denoising): B dicts with 'labels' int64 [n]
        and 'boxes' [n, 4] normalised cxcywh. Returns the output dict described in the module docstring."""
        memory, spatial_shapes, memory_maps = self._flatten_features(feats)

        dn_content = dn_ref_unact = attn_mask = dn_meta = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_content, dn_ref_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale)

        content, ref_unact, enc_boxes, enc_logits = self._decoder_input(
            memory, spatial_shapes, dn_content, dn_ref_unact)
        if self.training and self.num_denoising > 0 and dn_meta is None:
            # no box in the batch: keep the denoising embedding in the graph with a zero contribution, so
            # that DDP ranks whose batches do have boxes still find a gradient for it on every rank
            content = content + 0.0 * self.denoising_class_embed.weight.sum()

        out_boxes, out_logits = self.decoder(content, ref_unact, memory_maps, spatial_shapes, self.dec_bbox_head,
                                             self.dec_score_head, self.query_pos_head, attn_mask=attn_mask)

        if self.training and dn_meta is not None:
            dn_out_boxes, out_boxes = torch.split(out_boxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_boxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = self._pack(out_logits[:-1], out_boxes[:-1])
            out["enc_aux_outputs"] = self._pack([enc_logits], [enc_boxes])
            out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
            if dn_meta is not None:
                out["dn_aux_outputs"] = self._pack(dn_out_logits, dn_out_boxes)
                out["dn_meta"] = dn_meta
        return out
