"""RT-DETRv2 hybrid encoder: per-level input projections, AIFI (transformer self-attention on the
coarsest level(s)) and CCFM (top-down FPN + bottom-up PAN with CSP-RepVGG blocks).

Extension points (a subclass uses them, e.g. dset_encoder.DSETHybridEncoder; this module names no extension):
- ``HybridEncoder.build_attention_extras()``, called in ``__init__`` after the attention layers;
- ``HybridEncoder.attend_tokens(enc_i, src, pos_embed, hw, mask)``, the attention of one level's tokens;
- ``HybridEncoder.encode_level(enc_i, proj_feat, src_key_padding_mask)`` runs the attention of one level;
  ``HybridEncoder.position_embedding(enc_i, h, w, device)`` gives its [1, h*w, C] position embedding.
- ``TransformerEncoderLayer.forward`` takes ``src_key_padding_mask`` (padded / pruned sequences) and a
  per-sample ``pos_embed`` [B, N, C]; its FFN is ``forward_ffn`` (``linear1 -> act -> dropout -> linear2``)
  so it can be replaced by a mixture of experts.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from src.core.registry import register
from src.nn.backbone.common import ConvNormLayer, can_fold_conv_norm, get_activation
from src.zoo.rtdetr.position_embedding import TOKEN_ORDERS, sincos_position_embedding_2d

__all__ = ["HybridEncoder", "TransformerEncoderLayer", "TransformerEncoder", "CSPRepLayer", "RepVggBlock"]


class RepVggBlock(nn.Module):
    """``act(bn(conv3x3(x)) + bn(conv1x1(x)))`` (training form of RepVGG, no identity branch).

    x [B, ch_in, H, W] -> [B, ch_out, H, W].
    """

    def __init__(self, ch_in: int, ch_out: int, act: str = "relu"):
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv2 is None:  # reparameterized for deployment
            return self.act(self.conv1(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Deployment only (RepVGG): merge both branches into one 3x3 conv with bias, as the official
        ``convert_to_deploy`` does; the 1x1 kernel becomes the centre of a 3x3 one. The same outputs in inference
        within float rounding; ``conv2`` becomes None. Needs eval mode (ConvNormLayer.fold_norm); checks both
        branches before it changes anything, so a block it refuses stays as it was."""
        if self.conv2 is None:
            return
        for branch in (self.conv1, self.conv2):
            if not can_fold_conv_norm(branch):
                raise ValueError(f"RepVggBlock.reparameterize: branch norm {type(branch.norm).__name__} has no "
                                 f"running statistics to fold; the block is left unchanged")
            if branch.training:
                raise RuntimeError("RepVggBlock.reparameterize: the block is in training mode; call .eval() first "
                                   "(folding uses the running statistics, for inference only)")
        self.conv1.fold_norm()
        self.conv2.fold_norm()
        self.conv1.conv.weight.add_(nn.functional.pad(self.conv2.conv.weight, [1, 1, 1, 1]))
        self.conv1.conv.bias.add_(self.conv2.conv.bias)
        self.conv2 = None


class CSPRepLayer(nn.Module):
    """CSP block: ``conv3(bottlenecks(conv1(x)) + conv2(x))``, hidden width ``int(out * expansion)``;
    ``conv3`` (1x1 conv-norm-act) only when the hidden width differs from ``out_channels``.

    x [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, act=act) if hidden != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys only.

    ``x = norm1(src + dropout1(attn(q=src+pos, k=src+pos, v=src)))``,
    ``out = norm2(x + dropout2(forward_ffn(x)))`` (``normalize_before=True`` gives the pre-norm form).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.normalize_before = normalize_before
        self.activation_name = activation
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]: ``linear2(dropout(act(linear1(x))))``."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            src: [B, N, C] tokens.
            src_mask: optional attention mask [N, N] or [B * nhead, N, N] (True / -inf = blocked).
            pos_embed: optional [1, N, C] or [B, N, C], added to queries and keys.
            src_key_padding_mask: optional bool [B, N], True marks padding tokens that no query attends
                to (their own outputs are computed but meaningless).
        Returns:
            [B, N, C].
        """
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = src if pos_embed is None else src + pos_embed
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                need_weights=False)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)

        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = residual + self.dropout2(self.forward_ffn(src))
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer`` applied in sequence (keys ``layers.{i}``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src [B, N, C] -> [B, N, C]; the masks and pos_embed as in TransformerEncoderLayer.forward."""
        for layer in self.layers:
            src = layer(src, src_mask=src_mask, pos_embed=pos_embed, src_key_padding_mask=src_key_padding_mask)
        return src if self.norm is None else self.norm(src)


@register()
class HybridEncoder(nn.Module):
    """RT-DETRv2 hybrid encoder.

    Args:
        in_channels: channels of the backbone levels (fine to coarse), e.g. [128, 256, 512] for R18.
        feat_strides: their strides, e.g. [8, 16, 32].
        hidden_dim: C, channels of every output level.
        nhead, dim_feedforward, dropout, enc_act: the AIFI transformer layer.
        use_encoder_idx: levels that get self-attention (default the coarsest, [2]).
        num_encoder_layers: transformer layers per attended level (0 disables AIFI).
        pe_temperature: frequency base of the sin-cos position embedding.
        expansion: hidden-width ratio of the CSPRepLayers (0.5 for R18).
        depth_mult: RepVGG blocks per CSPRepLayer = round(3 * depth_mult).
        act: activation of the CCFM conv layers.
        eval_spatial_size: [H, W] input size whose position embeddings are precomputed (non-persistent
            buffers ``pos_embed{level}``, not in the state dict); other sizes are computed on the fly.
        version: only 'v2' (input_proj keys ``input_proj.{i}.conv`` / ``.norm``).
        pe_token_order: 'rtdetr' (published code, default) or 'row_major'; identical on square maps,
            see ``src/zoo/rtdetr/position_embedding.py`` for non-square inputs.

    Extension points (the plain encoder uses neither): ``build_attention_extras()`` is called in ``__init__``
    right after the attention layers are built, before the CCFM, and ``attend_tokens`` attends one level's
    tokens (DSET's ``dset_encoder.DSETHybridEncoder`` prunes there).

    forward(feats: list of [B, in_channels[i], H_i, W_i], each level half the size of the previous one)
        -> list of [B, hidden_dim, H_i, W_i], same strides.
    """

    __share__ = ["eval_spatial_size"]

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), feat_strides: Sequence[int] = (8, 16, 32),
                 hidden_dim: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 enc_act: str = "gelu", use_encoder_idx: Sequence[int] = (2,), num_encoder_layers: int = 1,
                 pe_temperature: float = 10000, expansion: float = 1.0, depth_mult: float = 1.0,
                 act: str = "silu", eval_spatial_size: Optional[Sequence[int]] = None, version: str = "v2",
                 pe_token_order: str = "rtdetr"):
        super().__init__()
        if version != "v2":
            raise ValueError(f"HybridEncoder: version={version!r} is not supported; only 'v2' (the RT-DETRv2 "
                             f"state-dict layout) is implemented")
        if len(in_channels) != len(feat_strides):
            raise ValueError(f"HybridEncoder: in_channels {list(in_channels)} and feat_strides "
                             f"{list(feat_strides)} must have the same length")
        if any(not 0 <= i < len(in_channels) for i in use_encoder_idx):
            raise ValueError(f"HybridEncoder: use_encoder_idx={list(use_encoder_idx)} must index the "
                             f"{len(in_channels)} input levels")
        if pe_token_order not in TOKEN_ORDERS:
            raise ValueError(f"HybridEncoder: pe_token_order={pe_token_order!r} is not one of {TOKEN_ORDERS}")
        if hidden_dim % 4 != 0:
            raise ValueError(f"HybridEncoder: hidden_dim={hidden_dim} must be divisible by 4 (2D sin-cos "
                             f"position embedding)")
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.pe_token_order = pe_token_order
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList(
            nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden_dim)),
            ])) for c in in_channels)

        encoder_layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                                dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList(
            TransformerEncoder(copy.deepcopy(encoder_layer), num_encoder_layers) for _ in self.use_encoder_idx)

        self.enc_act = enc_act
        self.build_attention_extras()  # here, so a subclass's modules keep their place in the init order

        num_blocks = round(3 * depth_mult)
        num_fusions = len(in_channels) - 1
        # top-down FPN: lateral_convs[j] / fpn_blocks[j] fuse level L-1-j into level L-2-j
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act)
                                           for _ in range(num_fusions))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(hidden_dim * 2, hidden_dim, num_blocks, expansion, act=act)
                                        for _ in range(num_fusions))
        # bottom-up PAN: downsample_convs[j] / pan_blocks[j] fuse level j into level j+1
        self.downsample_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act)
                                              for _ in range(num_fusions))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(hidden_dim * 2, hidden_dim, num_blocks, expansion, act=act)
                                        for _ in range(num_fusions))

        self._cached_pos_size = {}
        if self.eval_spatial_size:
            for level in self.use_encoder_idx:
                stride = self.feat_strides[level]
                h, w = self.eval_spatial_size[0] // stride, self.eval_spatial_size[1] // stride
                self.register_buffer(f"pos_embed{level}", self._build_pos_embed(h, w), persistent=False)
                self._cached_pos_size[level] = (h, w)

    def build_attention_extras(self):
        """Add modules that belong to the attended levels (subclasses); the plain encoder adds none."""

    def _build_pos_embed(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        return sincos_position_embedding_2d(h, w, self.hidden_dim, self.pe_temperature, self.pe_token_order,
                                            device=device)

    def position_embedding(self, enc_i: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """[1, h*w, C] position embedding of encoder ``enc_i`` (level ``use_encoder_idx[enc_i]``); the
        cached buffer when (h, w) is the eval_spatial_size grid, else computed."""
        level = self.use_encoder_idx[enc_i]
        if self._cached_pos_size.get(level) == (h, w):
            return getattr(self, f"pos_embed{level}").to(device)
        return self._build_pos_embed(h, w, device=device)

    def encode_level(self, enc_i: int, proj_feat: torch.Tensor,
                     src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Self-attention over all cells of one projected level.

        Args:
            enc_i: index into ``self.encoder`` (level ``use_encoder_idx[enc_i]``).
            proj_feat: [B, C, h, w].
            src_key_padding_mask: optional bool [B, h*w] (row-major cells), True = ignored as a key.
        Returns:
            [B, C, h, w].
        """
        b, c, h, w = proj_feat.shape
        src = proj_feat.flatten(2).permute(0, 2, 1)  # [B, h*w, C]
        pos_embed = self.position_embedding(enc_i, h, w, src.device)
        memory = self.attend_tokens(enc_i, src, pos_embed, (h, w), src_key_padding_mask)
        # back in proj_feat's layout (channels_last in a CPU deployment, deploy.inference_memory_format)
        channels_last = proj_feat.is_contiguous(memory_format=torch.channels_last) and not proj_feat.is_contiguous()
        return memory.permute(0, 2, 1).reshape(b, c, h, w).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def attend_tokens(self, enc_i: int, src: torch.Tensor, pos_embed: torch.Tensor, hw,
                      src_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention of one level on its tokens: src [B, h*w, C], pos_embed [1, h*w, C] -> [B, h*w, C]
        (a subclass may attend on fewer tokens, e.g. DSET's pruned ones)."""
        return self.encoder[enc_i](src, pos_embed=pos_embed, src_key_padding_mask=src_key_padding_mask)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder: got {len(feats)} feature maps, expected {len(self.in_channels)} "
                             f"(in_channels={self.in_channels}); check the backbone's return_idx")
        proj_feats = [proj(feat) for proj, feat in zip(self.input_proj, feats)]
        if self.num_encoder_layers > 0:
            for enc_i, level in enumerate(self.use_encoder_idx):
                proj_feats[level] = self.encode_level(enc_i, proj_feats[level])
        return self.fuse(proj_feats)

    def fuse(self, proj_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """CCFM. proj_feats: list of [B, C, H_i, W_i] (fine to coarse) -> list of the same shapes."""
        num_levels = len(proj_feats)
        # top-down: inner_outs[0] is the current coarsest fused map; laterals replace it in place
        inner_outs = [proj_feats[-1]]
        for j, level in enumerate(range(num_levels - 1, 0, -1)):
            feat_high = self.lateral_convs[j](inner_outs[0])
            inner_outs[0] = feat_high
            feat_low = proj_feats[level - 1]
            upsampled = F.interpolate(feat_high, scale_factor=2.0, mode="nearest")
            if upsampled.shape[2:] != feat_low.shape[2:]:
                raise ValueError(
                    f"HybridEncoder: level {level} map {tuple(feat_high.shape[2:])} upsampled x2 is "
                    f"{tuple(upsampled.shape[2:])} but level {level - 1} is {tuple(feat_low.shape[2:])}; "
                    f"input height and width must be multiples of {self.feat_strides[-1]}")
            inner_outs.insert(0, self.fpn_blocks[j](torch.cat([upsampled, feat_low], dim=1)))

        # bottom-up
        outs = [inner_outs[0]]
        for j in range(num_levels - 1):
            downsampled = self.downsample_convs[j](outs[-1])
            outs.append(self.pan_blocks[j](torch.cat([downsampled, inner_outs[j + 1]], dim=1)))
        return outs
