"""PResNet-18vd backbone, RT-DETRv2 hybrid encoder, 2D sin-cos position embedding, RTDETR wiring."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.core import registry
from src.nn.backbone.common import FrozenBatchNorm2d
from src.nn.backbone.presnet import PResNet
from src.zoo.rtdetr.hybrid_encoder import HybridEncoder, RepVggBlock, TransformerEncoder, TransformerEncoderLayer
from src.zoo.rtdetr.position_embedding import sincos_position_embedding_2d
from src.zoo.rtdetr.rtdetr import RTDETR

# official RT-DETRv2-R18vd state-dict layout (key<TAB>shape), kept in the repository
TABLE = Path(__file__).parent / "data" / "rtdetrv2_r18vd_state_dict.tsv"
needs_table = pytest.mark.skipif(not TABLE.exists(), reason=f"state-dict table not found at {TABLE}")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def make_backbone(**overrides):
    kwargs = dict(depth=18, variant="d", return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False)
    kwargs.update(overrides)
    return PResNet(**kwargs)


def make_encoder(**overrides):
    kwargs = dict(in_channels=[128, 256, 512], feat_strides=[8, 16, 32], hidden_dim=256, use_encoder_idx=[2],
                  num_encoder_layers=1, nhead=8, dim_feedforward=1024, dropout=0.0, enc_act="gelu",
                  expansion=0.5, depth_mult=1, act="silu", eval_spatial_size=[640, 640])
    kwargs.update(overrides)
    return HybridEncoder(**kwargs)


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics / affine terms so eval-mode norms are not identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))


def random_features(sizes, channels=(128, 256, 512), batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=gen) for c, (h, w) in zip(channels, sizes)]


def meshgrid_reference(h, w, dim=256, temperature=10000.0):
    """The published RT-DETR formulation: meshgrid(arange(W), arange(H), indexing='ij'), flattened."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = torch.outer(grid_w.flatten(), omega), torch.outer(grid_h.flatten(), omega)
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def _manual_post_norm_layer(src, pos, sd, p, heads):
    """Oracle: q = k = src + pos, v = src; x = LN(src + attn); out = LN(x + linear2(gelu(linear1(x))))."""
    b, n, d = src.shape
    w_q, w_k, w_v = sd[p + "self_attn.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = sd[p + "self_attn.in_proj_bias"].chunk(3)

    def heads_of(t):
        return t.reshape(b, n, heads, d // heads).transpose(1, 2)

    q, k, v = heads_of((src + pos) @ w_q.T + b_q), heads_of((src + pos) @ w_k.T + b_k), heads_of(src @ w_v.T + b_v)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    attn = attn.transpose(1, 2).reshape(b, n, d) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
    x = F.layer_norm(src + attn, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    ffn = F.gelu(x @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"]) @ sd[p + "linear2.weight"].T + sd[p + "linear2.bias"]
    return F.layer_norm(x + ffn, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])


@pytest.fixture(scope="module")
def r18_model():
    torch.manual_seed(0)
    backbone, encoder = make_backbone(), make_encoder()
    randomize_batch_norms(backbone, 1)
    randomize_batch_norms(encoder, 2)
    return backbone.eval(), encoder.eval()


# ----------------------------------------------------------------------------- state dict

@needs_table
def test_state_dict_keys_and_shapes_equal_official_r18vd_table():
    expected = [line.rstrip("\n").split("\t") for line in TABLE.read_text().splitlines() if line.strip()]
    expected = [(k, s) for k, s in expected if k.startswith(("backbone.", "encoder."))]
    ours = []
    for prefix, module in (("backbone.", make_backbone()), ("encoder.", make_encoder())):
        for key, value in module.state_dict().items():
            shape = "scalar" if value.dim() == 0 else "x".join(str(d) for d in value.shape)
            ours.append((prefix + key, shape))
    assert len(ours) == len(expected)
    assert ours == expected  # same keys, same shapes, same order


@needs_table
def test_parameter_count_equals_official_table():
    rows = [line.split("\t") for line in TABLE.read_text().splitlines() if line.strip()]

    def table_params(prefix):
        return sum(math.prod(int(d) for d in shape.split("x")) for key, shape in rows
                   if key.startswith(prefix) and not key.endswith(BUFFER_SUFFIXES))

    backbone_params = sum(p.numel() for p in make_backbone().parameters())
    encoder_params = sum(p.numel() for p in make_encoder().parameters())
    assert backbone_params == table_params("backbone.") == 11_199_968
    assert encoder_params == table_params("encoder.") == 4_965_120


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("height,width", [(640, 640), (736, 1280), (384, 640)])
def test_backbone_and_encoder_output_strides_8_16_32(r18_model, height, width):
    backbone, encoder = r18_model
    assert backbone.out_channels == [128, 256, 512] and backbone.out_strides == [8, 16, 32]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, height, width))
        outs = encoder(feats)
    strides = (8, 16, 32)
    assert [tuple(f.shape) for f in feats] == [(1, c, height // s, width // s) for c, s in zip((128, 256, 512), strides)]
    assert [tuple(o.shape) for o in outs] == [(1, 256, height // s, width // s) for s in strides]
    assert all(torch.isfinite(o).all() for o in outs)


def test_resnet50_variant_d_has_bottleneck_channels():
    backbone = PResNet(depth=50, variant="d", return_idx=[1, 2, 3]).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    assert backbone.out_channels == [512, 1024, 2048]
    assert [tuple(f.shape) for f in feats] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]


def test_input_not_multiple_of_stride_32_raises_clear_error():
    encoder = make_encoder(eval_spatial_size=None).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(random_features([(10, 10), (5, 5), (3, 3)]))


# ----------------------------------------------------------------------------- backbone maths

def _conv_bn(x, sd, prefix, stride, relu):
    weight = sd[prefix + "conv.weight"]
    x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2)
    x = F.batch_norm(x, sd[prefix + "norm.running_mean"], sd[prefix + "norm.running_var"],
                     sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], training=False, eps=1e-5)
    return F.relu(x) if relu else x


def _functional_presnet18vd(x, sd):
    """Oracle: ResNet18-vd written with torch.nn.functional straight from the state dict."""
    for name, stride in (("conv1_1", 2), ("conv1_2", 1), ("conv1_3", 1)):
        x = _conv_bn(x, sd, f"conv1.{name}.", stride, relu=True)
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for stage in range(4):
        for block in range(2):
            p = f"res_layers.{stage}.blocks.{block}."
            stride = 2 if block == 0 and stage > 0 else 1
            out = _conv_bn(x, sd, p + "branch2a.", stride, relu=True)
            out = _conv_bn(out, sd, p + "branch2b.", 1, relu=False)
            if block > 0:
                short = x
            elif stage == 0:
                short = _conv_bn(x, sd, p + "short.", 1, relu=False)
            else:
                short = _conv_bn(F.avg_pool2d(x, 2, 2, ceil_mode=True), sd, p + "short.conv.", 1, relu=False)
            x = F.relu(out + short)
        if stage > 0:
            outs.append(x)
    return outs


def test_presnet18vd_equals_functional_oracle(r18_model):
    backbone, _ = r18_model
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = backbone(x)
        expected = _functional_presnet18vd(x, backbone.state_dict())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _functional_hybrid_encoder(feats, sd, heads=8):
    """Oracle: RT-DETRv2 hybrid encoder (R18 config) with torch.nn.functional from the state dict."""
    def cbn(x, p, stride=1, act=True):
        y = _conv_bn(x, sd, p, stride, relu=False)
        return F.silu(y) if act else y

    def csp(x, p):
        x1 = cbn(x, p + "conv1.")
        for i in range(3):
            x1 = F.silu(cbn(x1, p + f"bottlenecks.{i}.conv1.", act=False) + cbn(x1, p + f"bottlenecks.{i}.conv2.", act=False))
        return cbn(x1 + cbn(x, p + "conv2."), p + "conv3.")

    p0, p1, p2 = [cbn(f, f"input_proj.{i}.", act=False) for i, f in enumerate(feats)]
    b, c, h, w = p2.shape
    tokens = p2.flatten(2).transpose(1, 2)
    tokens = _manual_post_norm_layer(tokens, meshgrid_reference(h, w, c), sd, "encoder.0.layers.0.", heads)
    p2 = tokens.transpose(1, 2).reshape(b, c, h, w)
    up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
    lat2 = cbn(p2, "lateral_convs.0.")
    fpn1 = csp(torch.cat([up(lat2), p1], 1), "fpn_blocks.0.")
    lat1 = cbn(fpn1, "lateral_convs.1.")
    out0 = csp(torch.cat([up(lat1), p0], 1), "fpn_blocks.1.")
    out1 = csp(torch.cat([cbn(out0, "downsample_convs.0.", stride=2), lat1], 1), "pan_blocks.0.")
    out2 = csp(torch.cat([cbn(out1, "downsample_convs.1.", stride=2), lat2], 1), "pan_blocks.1.")
    return [out0, out1, out2]


def test_hybrid_encoder_equals_functional_oracle_on_non_square_maps(r18_model):
    _, encoder = r18_model
    feats = random_features([(8, 12), (4, 6), (2, 3)], batch=2, seed=6)
    with torch.no_grad():
        ours = encoder(feats)
        expected = _functional_hybrid_encoder(feats, encoder.state_dict())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- freezing / loading

def test_freeze_at_freezes_stem_and_first_stages_only():
    def frozen_prefixes(backbone):
        return {name.split(".blocks")[0] if name.startswith("res_layers") else name.split(".")[0]
                for name, p in backbone.named_parameters() if not p.requires_grad}

    assert frozen_prefixes(make_backbone(freeze_at=-1)) == set()
    assert frozen_prefixes(make_backbone(freeze_at=0)) == {"conv1"}
    assert frozen_prefixes(make_backbone(freeze_at=2)) == {"conv1", "res_layers.0", "res_layers.1"}
    backbone = make_backbone(freeze_at=2)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("res_layers.2", "res_layers.3")) for n in trainable)
    with pytest.raises(ValueError, match="freeze_at"):
        make_backbone(freeze_at=7)


def test_freeze_norm_uses_frozen_bn_with_same_keys_and_outputs():
    torch.manual_seed(0)
    reference = make_backbone()
    randomize_batch_norms(reference)
    frozen = make_backbone(freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 23  # 3 stem + 4 stages x 5
    assert list(frozen.state_dict()) == list(reference.state_dict())
    assert all(not n.endswith(("norm.weight", "norm.bias")) for n, _ in frozen.named_parameters())
    frozen.load_state_dict(reference.state_dict())

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    frozen.train()  # frozen norms ignore train mode: batch statistics are never used nor accumulated
    with torch.no_grad():
        expected = reference.eval()(x)
        got = frozen(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.state_dict()["conv1.conv1_1.norm.running_mean"],
                               reference.state_dict()["conv1.conv1_1.norm.running_mean"])


def test_frozen_batch_norm_loads_state_without_num_batches_tracked():
    bn = nn.BatchNorm2d(4).eval()
    randomize_batch_norms(bn)
    frozen = FrozenBatchNorm2d(4)
    state = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    frozen.load_state_dict(state)  # strict: no missing-key error
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))


def test_pretrained_local_path_round_trip(tmp_path):
    torch.manual_seed(0)
    source = make_backbone()
    randomize_batch_norms(source)
    path = tmp_path / "presnet18vd.pth"
    torch.save(source.state_dict(), path)
    loaded = make_backbone(pretrained=str(path))
    for (k1, v1), (k2, v2) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    # frozen-norm backbones load the same file
    frozen = make_backbone(freeze_norm=True, pretrained=str(path))
    assert torch.equal(frozen.state_dict()["res_layers.3.blocks.1.branch2b.norm.running_var"],
                       source.state_dict()["res_layers.3.blocks.1.branch2b.norm.running_var"])


def test_pretrained_rejects_download_request_and_mismatched_file(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        make_backbone(pretrained=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_backbone(pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "prefixed.pth"
    torch.save({"backbone." + k: v for k, v in make_backbone().state_dict().items()}, path)
    with pytest.raises(KeyError, match="backbone."):
        make_backbone(pretrained=str(path))


# ----------------------------------------------------------------------------- position embedding

def _hand_embedding(coords, omegas=(1.0, 0.01)):
    """dim 8 -> 2 frequencies: 1 / 10000 ** (0/2) = 1 and 1 / 10000 ** (1/2) = 0.01."""
    rows = []
    for a, b in coords:
        rows.append([math.sin(a * omegas[0]), math.sin(a * omegas[1]), math.cos(a * omegas[0]), math.cos(a * omegas[1]),
                     math.sin(b * omegas[0]), math.sin(b * omegas[1]), math.cos(b * omegas[0]), math.cos(b * omegas[1])])
    return torch.tensor([rows], dtype=torch.float32)


def test_position_embedding_equals_hand_computed_2x3_grid():
    # H=2, W=3: row-major tokens n = 0..5 sit at (y, x) = (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    row_major = sincos_position_embedding_2d(2, 3, embed_dim=8, temperature=10000, token_order="row_major")
    torch.testing.assert_close(row_major, _hand_embedding([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]))
    # published RT-DETR order: (n // H, n % H)
    rtdetr = sincos_position_embedding_2d(2, 3, embed_dim=8, temperature=10000, token_order="rtdetr")
    torch.testing.assert_close(rtdetr, _hand_embedding([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]))


def test_position_embedding_rtdetr_order_equals_meshgrid_formulation_and_row_major_on_square():
    for h, w in [(20, 20), (23, 40), (12, 20)]:
        torch.testing.assert_close(sincos_position_embedding_2d(h, w), meshgrid_reference(h, w), rtol=0, atol=0)
    torch.testing.assert_close(sincos_position_embedding_2d(20, 20, token_order="row_major"),
                               sincos_position_embedding_2d(20, 20, token_order="rtdetr"), rtol=0, atol=0)


def test_eval_with_cached_pos_embed_equals_on_the_fly(r18_model):
    _, cached = r18_model
    on_the_fly = make_encoder(eval_spatial_size=None).eval()
    on_the_fly.load_state_dict(cached.state_dict())
    assert "pos_embed2" not in cached.state_dict()  # non-persistent buffer
    torch.testing.assert_close(cached.pos_embed2, sincos_position_embedding_2d(20, 20, 256), rtol=0, atol=0)
    for sizes in ([(80, 80), (40, 40), (20, 20)], [(8, 12), (4, 6), (2, 3)]):  # cached size, other size
        feats = random_features(sizes, seed=4)
        with torch.no_grad():
            for a, b in zip(cached(feats), on_the_fly(feats)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- attention layer

def test_encode_level_with_all_false_padding_mask_equals_no_mask(r18_model):
    _, encoder = r18_model
    proj = torch.randn(2, 256, 4, 6, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 24, dtype=torch.bool)
    with torch.no_grad():
        plain = encoder.encode_level(0, proj)
        masked = encoder.encode_level(0, proj, src_key_padding_mask=mask)
    assert plain.shape == (2, 256, 4, 6)
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=1e-6)


def test_masked_padding_tokens_do_not_change_real_tokens():
    torch.manual_seed(0)
    encoder = TransformerEncoder(TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu"), 2).eval()
    src, pos = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    padded_src = torch.cat([src, 100 * torch.randn(1, 3, 32)], dim=1)
    padded_pos = torch.cat([pos, torch.randn(1, 3, 32)], dim=1)
    mask = torch.tensor([[False] * 7 + [True] * 3])
    with torch.no_grad():
        expected = encoder(src, pos_embed=pos)
        got = encoder(padded_src, pos_embed=padded_pos, src_key_padding_mask=mask)[:, :7]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoder_layer_equals_torch_post_norm_layer_and_manual_attention_with_pos():
    torch.manual_seed(0)
    d, heads = 16, 2
    layer = TransformerEncoderLayer(d, heads, 32, dropout=0.0, activation="gelu").eval()
    torch_layer = nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=False).eval()
    torch_layer.load_state_dict(layer.state_dict())  # same parameter names
    src, pos = torch.randn(2, 5, d), torch.randn(1, 5, d)
    with torch.no_grad():
        torch.testing.assert_close(layer(src), torch_layer(src), rtol=1e-5, atol=1e-5)

        expected = _manual_post_norm_layer(src, pos, layer.state_dict(), "", heads)
        torch.testing.assert_close(layer(src, pos_embed=pos), expected, rtol=1e-5, atol=1e-5)


def test_repvgg_block_equals_single_fused_conv():
    torch.manual_seed(0)
    block = RepVggBlock(6, 6, act="silu").eval()
    randomize_batch_norms(block)

    def fused(branch):
        std = (branch.norm.running_var + branch.norm.eps).sqrt()
        scale = branch.norm.weight / std
        return branch.conv.weight * scale[:, None, None, None], branch.norm.bias - branch.norm.running_mean * scale

    k3, b3 = fused(block.conv1)
    k1, b1 = fused(block.conv2)
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        expected = F.silu(F.conv2d(x, k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1, padding=1))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- model wiring

class _RecordingDecoder(nn.Module):
    def forward(self, feats, targets=None):
        self.seen = (feats, targets)
        return {"pred_logits": torch.zeros(feats[0].shape[0], 3, 2), "pred_boxes": torch.zeros(feats[0].shape[0], 3, 4)}


def test_rtdetr_passes_backbone_then_encoder_features_and_targets_to_decoder(r18_model):
    backbone, encoder = r18_model
    model = RTDETR(backbone, encoder, _RecordingDecoder()).eval()
    assert registry.get("RTDETR") is RTDETR and RTDETR.__inject__ == ["backbone", "encoder", "decoder"]
    assert registry.get("PResNet") is PResNet and registry.get("HybridEncoder") is HybridEncoder
    x = torch.randn(1, 3, 64, 96)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.no_grad():
        out = model(x, targets)
        expected = encoder(backbone(x))
    feats, seen_targets = model.decoder.seen
    assert seen_targets is targets and set(out) == {"pred_logits", "pred_boxes"}
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(dict(model.named_children())) == {"backbone", "encoder", "decoder"}
