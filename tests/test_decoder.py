"""RT-DETRv2 decoder, deformable attention, contrastive denoising and postprocessor."""
import math
from pathlib import Path

import pytest
import torch

from src.zoo.rtdetr.deformable_attention import MSDeformableAttention, multi_scale_deformable_attention_core
from src.zoo.rtdetr.denoising import denoising_attention_mask, get_contrastive_denoising_training_group
from src.zoo.rtdetr.rtdetr_postprocessor import RTDETRPostProcessor
from src.zoo.rtdetr.rtdetrv2_decoder import RTDETRTransformerv2, generate_anchors

REFERENCE_TSV = Path(__file__).parent / "data" / "rtdetrv2_r18vd_state_dict.tsv"  # the official R18vd layout


def r18_decoder(**overrides):
    kwargs = dict(num_classes=80, feat_channels=[256, 256, 256], num_layers=3, num_points=[4, 4, 4],
                  eval_spatial_size=[640, 640])
    kwargs.update(overrides)
    return RTDETRTransformerv2(**kwargs)


def small_decoder(**overrides):
    kwargs = dict(num_classes=5, hidden_dim=32, num_queries=20, feat_channels=[16, 24, 32], num_layers=3,
                  num_points=[2, 3, 4], nhead=4, dim_feedforward=64, num_denoising=12, eval_spatial_size=[64, 64])
    kwargs.update(overrides)
    return RTDETRTransformerv2(**kwargs)


def small_feats(batch=2, height=64, width=64):
    return [torch.randn(batch, c, height // s, width // s) for c, s in zip([16, 24, 32], [8, 16, 32])]


def small_targets():
    return [{"labels": torch.tensor([1, 4, 0]),
             "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.2, 0.2]])},
            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


def empty_targets(batch=2):
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(batch)]


# ---------------------------------------------------------------- state dict and anchors
def test_decoder_state_dict_equals_reference_rows_in_order():
    rows = [line.rstrip("\n").split("\t") for line in open(REFERENCE_TSV) if line.startswith("decoder.")]
    state = r18_decoder().state_dict()
    ours = [("decoder." + k, "x".join(map(str, v.shape)) if v.dim() else "scalar") for k, v in state.items()]
    assert ours == [tuple(r) for r in rows]


def test_eval_anchors_640_have_8400_rows_and_eps_valid_mask():
    model = r18_decoder()
    anchors, valid = model.anchors, model.valid_mask
    assert anchors.shape == (1, 8400, 4) and valid.shape == (1, 8400, 1) and valid.dtype == torch.bool
    # level 0 is 80x80 with side 0.05: border cells have a centre at 0.5/80 = 0.00625 < eps or 79.5/80 > 1 - eps;
    # levels 1 (40x40, first centre 0.0125) and 2 (20x20, side 0.2) are all valid: 8400 - (6400 - 78 * 78)
    assert int(valid.sum()) == 8400 - (6400 - 78 * 78)
    assert not valid[0, 0, 0] and not valid[0, 79, 0] and not valid[0, 80 * 79, 0]
    assert torch.isinf(anchors[0, 0]).all()

    def logit(p):
        return math.log(p / (1 - p))

    # level 0 cell (row 1, col 2): centre (2.5/80, 1.5/80), side 0.05
    expected = torch.tensor([logit(2.5 / 80), logit(1.5 / 80), logit(0.05), logit(0.05)])
    assert torch.allclose(anchors[0, 80 + 2], expected, atol=1e-5)
    # level 1 first cell (index 6400): centre 0.5/40 = 0.0125 > eps, side 0.1
    assert valid[0, 6400, 0]
    assert torch.allclose(anchors[0, 6400], torch.tensor([logit(0.0125)] * 2 + [logit(0.1)] * 2), atol=1e-5)
    # level 2 last cell: centre 19.5/20, side 0.2
    assert torch.allclose(anchors[0, -1], torch.tensor([logit(0.975)] * 2 + [logit(0.2)] * 2), atol=1e-5)


@pytest.mark.parametrize("height,width,expected", [(736, 1280, 92 * 160 + 46 * 80 + 23 * 40),
                                                   (384, 640, 48 * 80 + 24 * 40 + 12 * 20)])
def test_anchors_for_non_square_inputs_follow_the_feature_sizes(height, width, expected):
    model = r18_decoder()
    shapes = [(height // s, width // s) for s in model.feat_strides]
    anchors, valid = model._anchors_for(shapes, torch.zeros(1))
    assert anchors.shape == (1, expected, 4) and valid.shape == (1, expected, 1)
    # level-0 cell (row 1, col 2): centre (2.5 / w0, 1.5 / h0), inside (eps, 1 - eps) for both sizes
    h0, w0 = shapes[0]
    cx, cy = torch.sigmoid(anchors[0, w0 + 2, :2]).tolist()
    assert math.isclose(cx, 2.5 / w0, rel_tol=1e-4) and math.isclose(cy, 1.5 / h0, rel_tol=1e-4)
    # column 0 of level 0 has centres x = 0.5 / w0 < eps (w0 = 160 or 80): invalid;
    # level 2 (w2 = 40 or 20, h2 = 23 or 12) has centres >= 0.5 / 40 > eps and side 0.2: all valid
    assert not valid[0, 0:h0 * w0:w0].any()
    h2, w2 = shapes[2]
    assert valid[0, -h2 * w2:].all()
    assert torch.equal(anchors, generate_anchors(shapes)[0])


def test_eval_forward_on_non_square_input_uses_computed_anchors():
    torch.manual_seed(0)
    model = small_decoder().eval()
    with torch.no_grad():
        out = model(small_feats(batch=1, height=64, width=128))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (1, 20, 5) and out["pred_boxes"].shape == (1, 20, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()


# ---------------------------------------------------------------- deformable attention
def bilinear_sample_loop(value_map, x, y):
    """grid_sample(bilinear, zeros, align_corners=False) for one point, written out: value_map [D, h, w]."""
    _, h, w = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[0], dtype=torch.float64)
    for xc in (x0, x0 + 1):
        for yc in (y0, y0 + 1):
            weight = (1 - abs(px - xc)) * (1 - abs(py - yc))
            if 0 <= xc < w and 0 <= yc < h:
                out += weight * value_map[:, yc, xc].double()
    return out


def deformable_attention_loop(value, shapes, locations, weights, num_points_list, sampler):
    batch, _, heads, dim = value.shape
    queries = locations.shape[1]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    level_of_point = [lvl for lvl, n in enumerate(num_points_list) for _ in range(n)]
    out = torch.zeros(batch, queries, heads * dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for p, lvl in enumerate(level_of_point):
                    h, w = shapes[lvl]
                    value_map = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(dim, h, w)
                    x, y = locations[b, q, m, p].tolist()
                    out[b, q, m * dim:(m + 1) * dim] += weights[b, q, m, p].double() * sampler(value_map, x, y)
    return out


def test_deformable_attention_core_equals_bilinear_loop():
    torch.manual_seed(0)
    shapes, num_points = [(3, 4), (2, 2), (1, 3)], [2, 3, 1]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3)
    locations = torch.rand(2, 4, 2, sum(num_points), 2) * 1.4 - 0.2  # some points fall outside the map
    weights = torch.rand(2, 4, 2, sum(num_points))
    fast = multi_scale_deformable_attention_core(value, shapes, locations, weights, num_points)
    slow = deformable_attention_loop(value, shapes, locations, weights, num_points, bilinear_sample_loop)
    assert fast.shape == (2, 4, 6)
    assert torch.allclose(fast.double(), slow, atol=1e-5)


def test_discrete_deformable_attention_takes_the_nearest_cell():
    torch.manual_seed(1)
    shapes, num_points = [(3, 4), (2, 5)], [2, 2]

    def nearest(value_map, x, y):
        _, h, w = value_map.shape
        xi = min(max(math.floor(x * w + 0.5), 0), w - 1)
        yi = min(max(math.floor(y * h + 0.5), 0), h - 1)
        return value_map[:, yi, xi].double()

    value = torch.randn(1, 22, 2, 3)
    locations = torch.rand(1, 5, 2, 4, 2) * 1.2 - 0.1
    weights = torch.rand(1, 5, 2, 4)
    fast = multi_scale_deformable_attention_core(value, shapes, locations, weights, num_points, method="discrete")
    slow = deformable_attention_loop(value, shapes, locations, weights, num_points, nearest)
    assert torch.allclose(fast.double(), slow, atol=1e-5)


def test_msdeformable_attention_samples_around_the_reference_box():
    """location = (cx, cy) + offset / num_points_level * (w, h) * 0.5, softmax over all points of a head."""
    torch.manual_seed(2)
    attn = MSDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=[1, 2])
    assert torch.allclose(attn.num_points_scale, torch.tensor([1.0, 0.5, 0.5]))
    with torch.no_grad():  # offsets and weights independent of the query: their biases only
        attn.sampling_offsets.weight.zero_()
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.copy_(torch.randn(6))
    shapes = [(4, 4), (2, 2)]
    query, value = torch.randn(1, 1, 8), torch.randn(1, 20, 8)
    box = torch.tensor([0.4, 0.6, 0.2, 0.4])
    out = attn(query, box.reshape(1, 1, 1, 4), value, shapes)

    offsets = attn.sampling_offsets.bias.detach().reshape(2, 3, 2)  # [heads, points, xy]
    per_point = torch.tensor([1.0, 0.5, 0.5]).reshape(1, 3, 1)
    locations = box[:2] + offsets * per_point * box[2:] * 0.5
    weights = attn.attention_weights.bias.detach().reshape(2, 3).softmax(-1)
    projected = attn.value_proj(value).reshape(1, 20, 2, 4)
    expected = attn.output_proj(multi_scale_deformable_attention_core(
        projected, shapes, locations[None, None], weights[None, None], [1, 2]))
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_value_from_level_maps_equals_value_from_tokens_and_the_linear_projection_with_a_padding_mask(batch, layout):
    """MSDeformableAttention projects its value per level map (a batched matmul on a channels-first map, F.linear
    on a channels-last map's cells, whose result the sampling reads with D innermost): the same as nn.Linear on
    the tokens (the reference below), from tokens or from the maps, with padding tokens zeroed, and a gradient
    that reaches value_proj."""
    torch.manual_seed(3)
    attn = MSDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=[2, 3])
    with torch.no_grad():
        attn.value_proj.bias.normal_()  # its init is zero
    shapes = [(3, 5), (2, 2)]
    queries = 4
    query = torch.randn(batch, queries, 8)
    reference = torch.rand(batch, queries, 1, 4) * 0.5 + 0.25
    maps = [torch.randn(batch, 8, h, w).contiguous(memory_format=layout) for h, w in shapes]
    tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, 19, 8]
    mask = torch.rand(batch, 19) > 0.3

    out_tokens = attn(query, reference, tokens, shapes, mask)
    out_maps = attn(query, reference, maps, shapes, mask)
    levels = attn.value_levels(maps, shapes)
    if layout == torch.channels_last:  # the sampling gets each head's map with D innermost
        assert all(v.stride(1) == 1 for v in levels)

    offsets = attn.sampling_offsets(query).reshape(batch, queries, 2, 5, 2)
    weights = attn.attention_weights(query).reshape(batch, queries, 2, 5).softmax(-1)
    locations = reference[..., :2].unsqueeze(2) + offsets * attn.num_points_scale[:, None] * \
        reference[..., 2:].unsqueeze(2) * 0.5
    value = (attn.value_proj(tokens) * mask.unsqueeze(-1)).reshape(batch, 19, 2, 4)
    expected = attn.output_proj(multi_scale_deformable_attention_core(value, shapes, locations, weights, [2, 3]))
    torch.testing.assert_close(out_tokens, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_maps, expected, atol=1e-5, rtol=1e-5)
    out_maps.sum().backward()
    assert attn.value_proj.weight.grad is not None and attn.value_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not match"):
        attn(query, reference, maps[::-1], shapes)


# ---------------------------------------------------------------- denoising
def test_denoising_attention_mask_isolates_groups():
    mask = denoising_attention_mask(num_denoising=4, group_size=2, num_queries=2)
    expected = torch.tensor([[0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_denoising_groups_layout_and_noise_ranges():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.1, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    content, ref_unact, mask, meta = get_contrastive_denoising_training_group(
        targets, num_classes=5, num_queries=7, class_embed=embed, num_denoising=6,
        label_noise_ratio=0.0, box_noise_scale=1.0)
    # G = 2 boxes, 3 groups of [2 positives, 2 negatives]
    assert meta["dn_num_group"] == 3 and meta["dn_num_split"] == [12, 7]
    assert meta["dn_positive_idx"][0].tolist() == [0, 1, 4, 5, 8, 9]
    assert meta["dn_positive_idx"][1].numel() == 0
    assert content.shape == (2, 12, 8) and ref_unact.shape == (2, 12, 4) and mask.shape == (19, 19)
    # no label noise: image 0 rows carry its labels' embeddings, image 1 only the padding row (zeros)
    assert torch.equal(content[0, 0], embed.weight[1]) and torch.equal(content[0, 5], embed.weight[3])
    assert torch.equal(content[1], torch.zeros(12, 8))


def test_denoising_box_noise_moves_positive_corners_less_than_negative_ones():
    """Corners move by < 1 half side for positives and by [1, 2) half sides for negatives."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.1, 0.3]])}]
    _, ref_unact, _, meta = get_contrastive_denoising_training_group(
        targets, num_classes=5, num_queries=7, class_embed=embed, num_denoising=100,
        label_noise_ratio=0.0, box_noise_scale=1.0)
    gt = torch.tensor([[0.4, 0.4, 0.6, 0.6], [0.35, 0.35, 0.45, 0.65]])
    half = torch.tensor([[0.1] * 4, [0.05, 0.15, 0.05, 0.15]])
    boxes = torch.sigmoid(ref_unact[0]).reshape(meta["dn_num_group"], 2, 2, 4)  # group, pos/neg, box, cxcywh
    corners = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    shift = (corners - gt).abs() / half
    assert (shift[:, 0] < 1 + 1e-3).all()
    # a negative whose corners crossed collapses to zero size (cxcywh of a flipped box): compare the others
    intact = (boxes[:, 1, :, 2:] > 1e-3).repeat(1, 1, 2)
    assert intact.float().mean() > 0.5
    negative_shift = shift[:, 1][intact]
    assert (negative_shift > 1 - 1e-3).all() and (negative_shift < 2 + 1e-3).all()


def test_denoising_with_an_empty_image_gives_finite_queries():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    content, ref_unact, mask, meta = get_contrastive_denoising_training_group(
        small_targets(), num_classes=5, num_queries=7, class_embed=embed)
    assert torch.isfinite(content).all() and torch.isfinite(ref_unact).all()
    assert meta["dn_num_group"] == 100 // 3 and content.shape[1] == 2 * 3 * 33
    assert [len(i) for i in meta["dn_positive_idx"]] == [3 * 33, 0]


def test_denoising_with_an_all_empty_batch_returns_nothing():
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    assert get_contrastive_denoising_training_group(empty_targets(), 5, 7, embed) == (None, None, None, None)


# ---------------------------------------------------------------- decoder forward
def test_decoder_training_forward_gives_every_output_with_its_shape():
    torch.manual_seed(0)
    model = small_decoder().train()
    out = model(small_feats(), small_targets())
    num_dn = 2 * 3 * (12 // 3)
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_aux_outputs", "enc_meta",
                        "dn_aux_outputs", "dn_meta"}
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 2 and len(out["enc_aux_outputs"]) == 1 and len(out["dn_aux_outputs"]) == 3
    assert out["enc_meta"] == {"class_agnostic": False}
    assert out["dn_meta"]["dn_num_split"] == [num_dn, 20]
    assert [len(i) for i in out["dn_meta"]["dn_positive_idx"]] == [3 * 4, 0]
    shapes = {"aux_outputs": 20, "enc_aux_outputs": 20, "dn_aux_outputs": num_dn}
    tensors = [out["pred_logits"], out["pred_boxes"]]
    for key, queries in shapes.items():
        for layer in out[key]:
            assert layer["pred_logits"].shape == (2, queries, 5) and layer["pred_boxes"].shape == (2, queries, 4)
            tensors += [layer["pred_logits"], layer["pred_boxes"]]
    assert all(torch.isfinite(t).all() for t in tensors)
    assert all(((t >= 0) & (t <= 1)).all() for t in tensors[1::2])  # boxes are sigmoid outputs
    sum(t.sum() for t in tensors).backward()
    assert torch.isfinite(model.denoising_class_embed.weight.grad).all()


def test_decoder_training_with_an_all_empty_batch_runs_without_denoising():
    torch.manual_seed(0)
    model = small_decoder().train()
    out = model(small_feats(), empty_targets())
    assert "dn_meta" not in out and "dn_aux_outputs" not in out
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    out["pred_logits"].sum().backward()
    # the denoising embedding stays in the graph (zero gradient) so DDP ranks agree
    assert torch.equal(model.denoising_class_embed.weight.grad, torch.zeros(6, 32))


def test_eval_output_is_the_last_training_layer():
    torch.manual_seed(0)
    model = small_decoder(num_denoising=0)
    feats = small_feats()
    model.eval()
    with torch.no_grad():
        evaluated = model(feats)
        model.train()
        model.input_proj.eval()  # same batch-norm statistics as in eval
        trained = model(feats)
    assert set(evaluated) == {"pred_logits", "pred_boxes"}
    assert torch.allclose(evaluated["pred_logits"], trained["pred_logits"], atol=1e-5)
    assert torch.allclose(evaluated["pred_boxes"], trained["pred_boxes"], atol=1e-5)


def test_decoder_layers_route_the_ffn_through_forward_ffn():
    torch.manual_seed(0)
    model = small_decoder(num_denoising=0).eval()
    feats = small_feats(batch=1)
    with torch.no_grad():
        before = model(feats)["pred_logits"]
        for layer in model.decoder.layers:
            layer.forward_ffn = lambda x: torch.zeros_like(x)
        after = model(feats)["pred_logits"]
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------- postprocessor
def test_postprocessor_returns_top_scores_with_scaled_xyxy_boxes():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 0, 1] = 2.0   # query 0 class 1
    logits[0, 2, 0] = 1.0   # query 2 class 0
    logits[0, 2, 1] = 0.0   # query 2 class 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    post = RTDETRPostProcessor(num_classes=2, num_top_queries=3)
    (result,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))
    assert result["labels"].tolist() == [1, 0, 1]
    assert torch.allclose(result["scores"], torch.sigmoid(torch.tensor([2.0, 1.0, 0.0])))
    expected = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0], [0.0, 50.0, 100.0, 100.0]])
    assert torch.allclose(result["boxes"], expected)


def test_postprocessor_softmax_and_coco_remap():
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # last column = no object
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]])
    post = RTDETRPostProcessor(num_classes=2, use_focal_loss=False, num_top_queries=1)
    (result,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))
    assert result["labels"].tolist() == [0]
    assert torch.allclose(result["scores"], torch.softmax(logits[0, 0], -1)[:1])
    assert torch.allclose(result["boxes"], torch.tensor([[0.0, 0.0, 10.0, 20.0]]))

    coco = RTDETRPostProcessor(num_classes=80, num_top_queries=2, remap_mscoco_category=True)
    logits = torch.full((1, 2, 80), -10.0)
    logits[0, 0, 11] = 5.0  # label 11 -> COCO id 13 (id 12 is unused)
    logits[0, 1, 79] = 4.0  # label 79 -> COCO id 90
    (result,) = coco({"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)}, torch.tensor([[1, 1]]))
    assert result["labels"].tolist() == [13, 90]
