"""RT-DETRv2 decoder against a functional reference written from its state dict, in float64: query selection
(encoder heads on the anchors, top-k, initial boxes and content), iterative box refinement with the detached
references between layers, the outputs of every layer, and the denoising queries with their attention mask.

The reference is plain torch on the state-dict tensors (``state_dict(keep_vars=True)``, so gradients reach the
same parameters) following the RT-DETRv2 maths; it calls no method of the module. Its deformable attention
samples bilinearly by gathering the four cells around each point (the module uses grid_sample).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from src.zoo.rtdetr.denoising import get_contrastive_denoising_training_group
from src.zoo.rtdetr.rtdetrv2_decoder import RTDETRTransformerv2, generate_anchors

CONFIG = dict(num_classes=4, hidden_dim=16, num_queries=8, feat_channels=[8, 8, 8], feat_strides=[8, 16, 32],
              num_levels=3, num_points=[2, 1, 2], nhead=2, num_layers=2, dim_feedforward=32, num_denoising=6,
              eps=0.04, eval_spatial_size=[128, 96])
# 128 x 96 input: maps 16x12, 8x6, 4x3; with eps 0.04 the top and bottom rows of level 0 (centre y 0.5 / 16 and
# 15.5 / 16) are invalid anchors, 24 of 252, its first and last columns (centre x 0.5 / 12 > 0.04) are valid
IMAGE_HW = (128, 96)
TOLERANCE = dict(rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- the module under test
def randomized_decoder(seed=0, **overrides):
    """The decoder in float64 with every parameter and norm statistic random (the module's own init zeroes the
    box heads' last layers and the attention weights, which would make the refinement an identity).

    Its stored anchors (for IMAGE_HW) are rebuilt in float64: the module builds them in float32 like the official
    code, and that rounding (1e-7) would otherwise set the tolerance of every comparison."""
    torch.manual_seed(seed)
    model = RTDETRTransformerv2(**{**CONFIG, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    model = model.double()
    shapes = [(IMAGE_HW[0] // s, IMAGE_HW[1] // s) for s in CONFIG["feat_strides"]]
    model.anchors, model.valid_mask = generate_anchors(shapes, eps=CONFIG["eps"], dtype=torch.float64)
    return model


def random_feats(seed=1, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, IMAGE_HW[0] // s, IMAGE_HW[1] // s, generator=gen, dtype=torch.float64)
            for c, s in zip(CONFIG["feat_channels"], CONFIG["feat_strides"])]


def dn_targets():
    """Image 0 has two boxes, image 1 one: G = 2, 6 // 2 = 3 groups of 2 positives + 2 negatives."""
    return [{"labels": torch.tensor([1, 3]),
             "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.2, 0.7, 0.1, 0.3]], dtype=torch.float64)},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.6, 0.4, 0.5]], dtype=torch.float64)}]


def run_with_probes(model, feats, targets=None):
    """The module's output dict and what it computed on the way: the encoder-head tables over all anchors and
    the decoder's inputs (content, logit-space reference boxes, self-attention mask)."""
    seen = {}
    batch = feats[0].shape[0]  # the heads run on [B*L, c] rows; the tables are read back as [B, L, c]
    hooks = [model.enc_output.register_forward_hook(
                 lambda m, args, out: seen.update(enc_memory=out.reshape(batch, -1, out.shape[-1]))),
             model.enc_score_head.register_forward_hook(
                 lambda m, args, out: seen.update(enc_logits=out.reshape(batch, -1, out.shape[-1]))),
             model.decoder.register_forward_pre_hook(
                 lambda m, args, kwargs: seen.update(content=args[0], ref_unact=args[1],
                                                     attn_mask=kwargs.get("attn_mask")), with_kwargs=True)]
    try:
        out = model(feats, targets)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen


def selected_anchors(content, enc_memory):
    """The anchor each query was taken from: the one row of enc_memory its content equals exactly, -1 where
    several rows do (invalid anchors all have the same zeroed memory). content [B, Q, d], enc_memory [B, L, d]."""
    matches = (content[:, :, None, :] == enc_memory[:, None, :, :]).all(-1)  # [B, Q, L]
    assert (matches.sum(-1) >= 1).all(), "a query's content is no row of the encoder output"
    return torch.where(matches.sum(-1) == 1, matches.int().argmax(-1), -1)


# ---------------------------------------------------------------- the functional reference
def _linear(x, sd, prefix):
    return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-5)


def _mlp(x, sd, prefix, num_layers):
    for i in range(num_layers):
        x = _linear(x, sd, f"{prefix}layers.{i}.")
        x = x.relu() if i < num_layers - 1 else x
    return x


def _logit(p, eps=1e-5):
    """RT-DETR's inverse sigmoid: p clipped into [0, 1], both terms kept >= eps (a box at 0 or 1 stays finite)."""
    p = p.clamp(0.0, 1.0)
    return torch.log(p.clamp(min=eps)) - torch.log((1 - p).clamp(min=eps))


def reference_anchors(shapes, eps, grid_size=0.05):
    """One box per cell, row-major per level: centre ((j + 0.5) / w, (i + 0.5) / h), side grid_size * 2**level;
    valid when all four values lie in (eps, 1 - eps). Returns logit-space boxes [L, 4] (+inf where invalid) and
    the valid flags [L]."""
    rows = [[(j + 0.5) / w, (i + 0.5) / h, grid_size * 2 ** level, grid_size * 2 ** level]
            for level, (h, w) in enumerate(shapes) for i in range(h) for j in range(w)]
    boxes = torch.tensor(rows, dtype=torch.float64)
    valid = ((boxes > eps) & (boxes < 1 - eps)).all(-1)
    return torch.where(valid[:, None], torch.log(boxes / (1 - boxes)), math.inf), valid


def reference_denoising_mask(num_denoising, group_size, num_queries):
    """True = blocked. A denoising query sees its own group and the matching queries; a matching query sees
    only the matching queries."""
    group = [q // group_size for q in range(num_denoising)] + [None] * num_queries
    mask = [[(gi is None and gj is not None) or (gi is not None and gj is not None and gi != gj)
             for gj in group] for gi in group]
    return torch.tensor(mask)


def _bilinear(value, h, w, locations):
    """value [B, h*w, M, D] (cells row-major), locations [B, Q, M, n, 2] as (x, y) in [0, 1] of the map, cell
    (i, j) centred at ((j + 0.5) / w, (i + 0.5) / h), zero outside the map -> [B, Q, M, n, D]."""
    batch, _, heads, dim = value.shape
    queries, points = locations.shape[1], locations.shape[3]
    px, py = locations[..., 0] * w - 0.5, locations[..., 1] * h - 0.5
    per_head = value.permute(0, 2, 1, 3)  # [B, M, h*w, D]
    out = 0
    for x in (px.floor(), px.floor() + 1):
        for y in (py.floor(), py.floor() + 1):
            weight = (1 - (px - x).abs()) * (1 - (py - y).abs()) * ((x >= 0) & (x < w) & (y >= 0) & (y < h))
            cell = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).long().permute(0, 2, 1, 3)  # [B, M, Q, n]
            picked = per_head.gather(2, cell.reshape(batch, heads, -1, 1).expand(-1, -1, -1, dim))
            out = out + weight[..., None] * picked.reshape(batch, heads, queries, points, dim).permute(0, 2, 1, 3, 4)
    return out


def _deformable_cross_attention(query, boxes, memory, shapes, sd, prefix):
    """Point k of level l of head m samples (cx, cy) + offset / num_points_l * (w, h) / 2; softmax over all the
    points of a head."""
    batch, queries, d = query.shape
    heads, points = CONFIG["nhead"], CONFIG["num_points"]
    value = _linear(memory, sd, prefix + "value_proj.").reshape(batch, -1, heads, d // heads)
    offsets = _linear(query, sd, prefix + "sampling_offsets.").reshape(batch, queries, heads, sum(points), 2)
    weights = _linear(query, sd, prefix + "attention_weights.").reshape(batch, queries, heads, sum(points))
    weights = weights.softmax(-1)
    per_point = torch.tensor([1 / n for n in points for _ in range(n)], dtype=query.dtype)[:, None]
    box = boxes[:, :, None, None, :]
    locations = box[..., :2] + offsets * per_point * box[..., 2:] * 0.5
    out, first_cell, first_point = 0, 0, 0
    for (h, w), n in zip(shapes, points):
        sampled = _bilinear(value[:, first_cell:first_cell + h * w], h, w,
                            locations[:, :, :, first_point:first_point + n])
        out = out + (weights[..., first_point:first_point + n, None] * sampled).sum(3)
        first_cell, first_point = first_cell + h * w, first_point + n
    return _linear(out.reshape(batch, queries, d), sd, prefix + "output_proj.")


def _self_attention(target, pos, mask, sd, prefix):
    batch, queries, d = target.shape
    heads = CONFIG["nhead"]
    w_q, w_k, w_v = sd[prefix + "in_proj_weight"].chunk(3)
    b_q, b_k, b_v = sd[prefix + "in_proj_bias"].chunk(3)

    def split(t):
        return t.reshape(batch, queries, heads, d // heads).transpose(1, 2)

    q, k, v = split((target + pos) @ w_q.T + b_q), split((target + pos) @ w_k.T + b_k), split(target @ w_v.T + b_v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores.masked_fill(mask, -math.inf)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, queries, d)
    return _linear(attended, sd, prefix + "out_proj.")


def _decoder_layer(target, boxes, memory, shapes, mask, sd, prefix):
    """Post-norm: self-attention (q = k = target + pos), deformable cross-attention, ReLU FFN."""
    pos = _mlp(boxes, sd, "query_pos_head.", 2)
    target = _layer_norm(target + _self_attention(target, pos, mask, sd, prefix + "self_attn."), sd, prefix + "norm1.")
    attended = _deformable_cross_attention(target + pos, boxes, memory, shapes, sd, prefix + "cross_attn.")
    target = _layer_norm(target + attended, sd, prefix + "norm2.")
    ffn = _linear(_linear(target, sd, prefix + "linear1.").relu(), sd, prefix + "linear2.")
    return _layer_norm(target + ffn, sd, prefix + "norm3.")


def reference_decoder(sd, feats, training, method="default", denoising=None, num_queries=CONFIG["num_queries"]):
    """RT-DETRv2 decoder from the state dict.

    Args:
        sd: state dict (float64); feats: list of [B, C, h_l, w_l]; training: batch norms use batch statistics.
        denoising: None, or (content [B, N, d], logit-space boxes [B, N, 4], group size) prepended to the queries.

    Returns:
        dict: 'enc_memory' [B, L, d], 'enc_logits' [B, L, C'], 'index' [B, Q] (-1 for an invalid anchor),
        'content' [B, N + Q, d], 'ref_unact' [B, N + Q, 4], 'attn_mask' or None, 'layers' (logits, boxes) per layer
        over all N + Q queries, 'enc_topk' (logits, boxes) of the selected proposals.
    """
    maps = []
    for level, x in enumerate(feats):
        p = f"input_proj.{level}."
        x = F.conv2d(x, sd[p + "conv.weight"])
        stats = (None, None) if training else (sd[p + "norm.running_mean"], sd[p + "norm.running_var"])
        maps.append(F.batch_norm(x, *stats, sd[p + "norm.weight"], sd[p + "norm.bias"], training=training, eps=1e-5))
    shapes = [tuple(m.shape[2:]) for m in maps]
    memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, L, d]

    # query selection: the encoder heads on the memory (zeroed at invalid anchors), top-k by the best class
    anchors, valid = reference_anchors(shapes, CONFIG["eps"])
    enc_memory = _layer_norm(_linear(memory * valid[:, None], sd, "enc_output.proj."), sd, "enc_output.norm.")
    enc_logits = _linear(enc_memory, sd, "enc_score_head.")
    enc_coords = _mlp(enc_memory, sd, "enc_bbox_head.", 3) + anchors
    if method == "one2many":  # the best (anchor, class) pairs; an anchor may come twice
        index = enc_logits.flatten(1).topk(num_queries).indices // enc_logits.shape[-1]
    else:  # default: best class of each anchor; agnostic: its single score
        index = enc_logits.max(-1).values.topk(num_queries).indices
    rows = torch.arange(index.shape[0])[:, None]
    content, ref_unact = enc_memory[rows, index].detach(), enc_coords[rows, index].detach()
    attn_mask = None
    if denoising is not None:
        dn_content, dn_ref_unact, group_size = denoising
        content, ref_unact = torch.cat([dn_content, content], 1), torch.cat([dn_ref_unact, ref_unact], 1)
        attn_mask = reference_denoising_mask(dn_content.shape[1], group_size, num_queries)

    # iterative refinement: a layer samples around the previous boxes, detached; the loss sees its boxes through
    # the previous layer's boxes with their gradient (one step back: "look forward twice")
    sampled_ref = ref_unact.sigmoid()
    previous = sampled_ref
    target, layers = content, []
    for i in range(CONFIG["num_layers"]):
        target = _decoder_layer(target, sampled_ref, memory, shapes, attn_mask, sd, f"decoder.layers.{i}.")
        delta = _mlp(target, sd, f"dec_bbox_head.{i}.", 3)
        layers.append((_linear(target, sd, f"dec_score_head.{i}."), (delta + _logit(previous)).sigmoid()))
        previous = (delta + _logit(sampled_ref)).sigmoid()
        sampled_ref = previous.detach()
    return {"enc_memory": enc_memory, "enc_logits": enc_logits, "index": torch.where(valid[index], index, -1),
            "content": content, "ref_unact": ref_unact, "attn_mask": attn_mask, "layers": layers,
            "enc_topk": (enc_logits[rows, index], enc_coords[rows, index].sigmoid())}


def expected_training_outputs(reference, num_denoising):
    """The reference's layers in the module's training output layout (denoising queries first)."""
    def pack(layers, part):
        return [{"pred_logits": logits[:, part], "pred_boxes": boxes[:, part]} for logits, boxes in layers]

    matching, dn = slice(num_denoising, None), slice(0, num_denoising)
    expected = {**pack(reference["layers"][-1:], matching)[0], "aux_outputs": pack(reference["layers"][:-1], matching),
                "enc_aux_outputs": pack([reference["enc_topk"]], slice(None))}
    if num_denoising:
        expected["dn_aux_outputs"] = pack(reference["layers"], dn)
    return expected


def assert_outputs_close(ours, expected):
    for key, value in expected.items():
        if isinstance(value, list):
            assert len(ours[key]) == len(value), key
            for a, b in zip(ours[key], value):
                assert_outputs_close(a, b)
        else:
            torch.testing.assert_close(ours[key], value, **TOLERANCE)


def replay_denoising(model, seed):
    """The denoising queries the module drew after torch.manual_seed(seed) (the first random draw of its
    training forward), with their group size for the reference's mask."""
    torch.manual_seed(seed)
    content, ref_unact, _, meta = get_contrastive_denoising_training_group(
        dn_targets(), CONFIG["num_classes"], CONFIG["num_queries"], model.denoising_class_embed,
        num_denoising=CONFIG["num_denoising"], label_noise_ratio=model.label_noise_ratio,
        box_noise_scale=model.box_noise_scale)
    return content, ref_unact, content.shape[1] // meta["dn_num_group"]


def score_border_anchors_highest(model):
    """Aim the zeroed memory of the invalid anchors (enc_output gives them LayerNorm(proj.bias)) at the best
    class's score direction: they reach the highest score any token can, so they outrank every valid anchor.

    A LayerNorm output is gamma * n + beta with n of zero mean and norm sqrt(d), so class c scores at most
    sqrt(d) * |centred(w_c * gamma)| + w_c . beta + b_c, reached when n points along centred(w_c * gamma)."""
    with torch.no_grad():
        score, norm = model.enc_score_head, model.enc_output.norm
        direction = score.weight * norm.weight
        direction = direction - direction.mean(-1, keepdim=True)
        best_score = direction.norm(dim=-1) * math.sqrt(CONFIG["hidden_dim"]) + score.weight @ norm.bias + score.bias
        best = direction[best_score.argmax()]
        model.enc_output.proj.bias.copy_(best / best.norm())


# ---------------------------------------------------------------- query selection
@pytest.mark.parametrize("method", ["default", "agnostic", "one2many"])
def test_query_selection_picks_the_topk_anchors_of_the_reference(method):
    model = randomized_decoder(query_select_method=method).eval()
    if method == "one2many":  # classes 0 and 1 score alike: an anchor is picked for both, so twice
        with torch.no_grad():
            model.enc_score_head.weight[1] = model.enc_score_head.weight[0]
            model.enc_score_head.bias[1] = model.enc_score_head.bias[0] - 0.01
    feats = random_feats()
    with torch.no_grad():
        _, seen = run_with_probes(model, feats)
        reference = reference_decoder(model.state_dict(), feats, training=False, method=method)
    torch.testing.assert_close(seen["enc_memory"], reference["enc_memory"], **TOLERANCE)
    torch.testing.assert_close(seen["enc_logits"], reference["enc_logits"], **TOLERANCE)
    picked = selected_anchors(seen["content"], seen["enc_memory"])
    assert torch.equal(picked, reference["index"])
    assert (picked >= 0).all()  # with random weights no invalid anchor is among the best
    torch.testing.assert_close(seen["content"], reference["content"], **TOLERANCE)
    torch.testing.assert_close(seen["ref_unact"], reference["ref_unact"], **TOLERANCE)
    assert seen["attn_mask"] is None
    if method == "one2many":
        assert all(len(set(row.tolist())) < CONFIG["num_queries"] for row in picked)


def test_border_anchors_whose_zeroed_memory_scores_highest_are_selected_first():
    """24 invalid anchors per image, all with the same (highest) score, then 6 valid ones: the invalid ones come
    first with a box of (1, 1, 1, 1) (+inf in logit space) and the decoder refines them to finite boxes."""
    model = randomized_decoder(num_queries=30).eval()
    score_border_anchors_highest(model)
    feats = random_feats()
    with torch.no_grad():
        out, seen = run_with_probes(model, feats)
        reference = reference_decoder(model.state_dict(), feats, training=False, num_queries=30)
    assert (reference["index"][:, :24] == -1).all() and (reference["index"][:, 24:] >= 0).all()
    assert torch.equal(selected_anchors(seen["content"], seen["enc_memory"]), reference["index"])
    assert torch.isinf(seen["ref_unact"][:, :24]).all() and torch.isfinite(seen["ref_unact"][:, 24:]).all()
    torch.testing.assert_close(seen["content"], reference["content"], **TOLERANCE)
    torch.testing.assert_close(seen["ref_unact"], reference["ref_unact"], **TOLERANCE)
    logits, boxes = reference["layers"][-1]
    torch.testing.assert_close(out["pred_logits"], logits, **TOLERANCE)
    torch.testing.assert_close(out["pred_boxes"], boxes, **TOLERANCE)
    assert torch.isfinite(out["pred_boxes"]).all()


# ---------------------------------------------------------------- iterative refinement
@pytest.mark.parametrize("eval_idx", [-1, 0])
def test_eval_boxes_are_the_reference_refinement_of_layer_eval_idx(eval_idx):
    model = randomized_decoder(eval_idx=eval_idx).eval()
    feats = random_feats()
    with torch.no_grad():
        out = model(feats)
        reference = reference_decoder(model.state_dict(), feats, training=False)
    logits, boxes = reference["layers"][eval_idx]
    assert set(out) == {"pred_logits", "pred_boxes"}
    torch.testing.assert_close(out["pred_logits"], logits, **TOLERANCE)
    torch.testing.assert_close(out["pred_boxes"], boxes, **TOLERANCE)
    # each layer moves the boxes: the two layers' boxes are not the same
    assert (reference["layers"][0][1] - reference["layers"][1][1]).abs().max() > 1e-2


def test_training_outputs_equal_the_reference_for_every_layer_and_denoising_group():
    model = randomized_decoder().train()
    feats = random_feats()
    with torch.no_grad():
        torch.manual_seed(5)
        out, seen = run_with_probes(model, feats, dn_targets())
        denoising = replay_denoising(model, seed=5)
        reference = reference_decoder(model.state_dict(), feats, training=True, denoising=denoising)
    num_denoising = denoising[0].shape[1]
    assert num_denoising == 3 * 2 * 2 and out["dn_meta"]["dn_num_split"] == [12, CONFIG["num_queries"]]
    assert torch.equal(seen["attn_mask"], reference["attn_mask"])
    torch.testing.assert_close(seen["ref_unact"], reference["ref_unact"], **TOLERANCE)
    expected = expected_training_outputs(reference, num_denoising)
    assert set(out) == set(expected) | {"enc_meta", "dn_meta"}
    assert_outputs_close(out, expected)


def test_training_gradients_reach_the_previous_layers_box_but_not_its_sampling():
    """The loss on layer i's boxes reaches layer i-1 through its boxes, not through the reference points layer i
    sampled around (detached); the encoder heads get gradient only from their own proposals' outputs (the
    decoder's initial content and boxes are detached)."""
    model = randomized_decoder().train()
    feats = random_feats()
    torch.manual_seed(5)
    out = model(feats, dn_targets())
    denoising = replay_denoising(model, seed=5)
    sd = model.state_dict(keep_vars=True)
    expected = expected_training_outputs(reference_decoder(sd, feats, training=True, denoising=denoising),
                                         denoising[0].shape[1])

    def weighted_sum(outputs):
        tensors = [outputs["pred_logits"], outputs["pred_boxes"]] + [
            layer[key] for name in ("aux_outputs", "enc_aux_outputs", "dn_aux_outputs") for layer in outputs[name]
            for key in ("pred_logits", "pred_boxes")]
        gen = torch.Generator().manual_seed(7)
        return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)

    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(weighted_sum(out), params, allow_unused=True)
    theirs = torch.autograd.grad(weighted_sum(expected), params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours, theirs):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_matching_queries_do_not_see_the_denoising_queries():
    model = randomized_decoder().train()
    feats = random_feats()
    with torch.no_grad():
        with_dn = model(feats, dn_targets())
        without_dn = model(feats)
    assert "dn_aux_outputs" in with_dn and "dn_aux_outputs" not in without_dn
    assert_outputs_close(with_dn, {key: without_dn[key] for key in
                                   ("pred_logits", "pred_boxes", "aux_outputs", "enc_aux_outputs")})
