"""HungarianMatcher against brute force; RTDETRCriterionv2 against hand-computed and per-element values."""
import itertools
import math

import pytest
import torch
import torchvision.ops as tvops

import src.zoo.rtdetr.rtdetrv2_criterion as criterion_module
from src.zoo.rtdetr.matcher import HungarianMatcher
from src.zoo.rtdetr.rtdetrv2_criterion import RTDETRCriterionv2

COSTS = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
WEIGHTS = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
VFL_ALPHA, VFL_GAMMA = 0.75, 2.0


# ----------------------------------------------------------------------------- helpers
def random_cxcywh(shape, generator):
    centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=-1)


def make_targets(counts, num_classes, generator):
    return [{"labels": torch.randint(0, num_classes, (n,), generator=generator),
             "boxes": random_cxcywh((n,), generator)} for n in counts]


def make_outputs(batch, queries, num_classes, generator, num_layers=3, dn_meta=None, dn_queries=0,
                 enc_classes=None):
    """Random decoder outputs in the repo's convention, all leaves requiring grad."""
    def layer(q, c):
        return {"pred_logits": torch.randn(batch, q, c, generator=generator).requires_grad_(),
                "pred_boxes": random_cxcywh((batch, q), generator).requires_grad_()}

    outputs = layer(queries, num_classes)
    outputs["aux_outputs"] = [layer(queries, num_classes) for _ in range(num_layers - 1)]
    outputs["enc_aux_outputs"] = [layer(queries, enc_classes or num_classes)]
    outputs["enc_meta"] = {"class_agnostic": enc_classes == 1}
    if dn_meta is not None:
        outputs["dn_aux_outputs"] = [layer(dn_queries, num_classes) for _ in range(num_layers)]
        outputs["dn_meta"] = dn_meta
    return outputs


def denoising_meta(counts, num_group):
    """dn_meta laid out as RT-DETRv2's denoising builds it: per group max_gt positives then max_gt negatives."""
    max_gt = max(max(counts), 1)
    positive_idx = [torch.cat([torch.arange(n) + 2 * max_gt * g for g in range(num_group)]).long()
                    for n in counts]
    num_dn = 2 * max_gt * num_group
    return {"dn_positive_idx": positive_idx, "dn_num_group": num_group, "dn_num_split": [num_dn, 0]}, num_dn


def make_criterion(num_classes, losses=("vfl", "boxes"), matcher=None, **kwargs):
    weights = {k: WEIGHTS[k] for name in losses for k in criterion_module.LOSS_TERMS[name]}
    return RTDETRCriterionv2(matcher or HungarianMatcher(COSTS), weights, list(losses), alpha=VFL_ALPHA,
                             gamma=VFL_GAMMA, num_classes=num_classes, **kwargs)


class FixedMatcher:
    """Stand-in matcher returning given per-image indices."""

    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return {"indices": self.indices}


def oracle_cost(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0):
    """Per-element matching cost of one image as a list of lists [Q][n] (float64 maths)."""
    xyxy = tvops.box_convert(boxes.double(), "cxcywh", "xyxy")
    tgt_xyxy = tvops.box_convert(tgt_boxes.double(), "cxcywh", "xyxy")
    cost = []
    for q in range(boxes.shape[0]):
        row = []
        for j in range(len(labels)):
            p = 1.0 / (1.0 + math.exp(-float(logits[q, labels[j]])))
            pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
            l1 = sum(abs(float(boxes[q, k]) - float(tgt_boxes[j, k])) for k in range(4))
            giou = float(tvops.generalized_box_iou(xyxy[q:q + 1], tgt_xyxy[j:j + 1])[0, 0])
            row.append(COSTS["cost_class"] * (pos - neg) + COSTS["cost_bbox"] * l1 - COSTS["cost_giou"] * giou)
        cost.append(row)
    return cost


def brute_force_assignment(cost, num_queries, num_targets):
    """Optimal (query per target) tuple and its total cost over all injective assignments."""
    best = min(itertools.permutations(range(num_queries), num_targets),
               key=lambda perm: sum(cost[q][j] for j, q in enumerate(perm)))
    return best, sum(cost[q][j] for j, q in enumerate(best))


# ----------------------------------------------------------------------------- matcher
def test_matcher_equals_bruteforce_optimal_assignment_on_random_cases():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(COSTS)
    queries, num_classes, counts = 5, 4, [0, 1, 2, 3, 4, 4, 2]
    for _ in range(6):
        logits = torch.randn(len(counts), queries, num_classes, generator=g)
        boxes = random_cxcywh((len(counts), queries), g)
        targets = make_targets(counts, num_classes, g)
        indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)["indices"]
        assert len(indices) == len(counts)
        for b, (src, tgt) in enumerate(indices):
            n = counts[b]
            assert src.dtype == tgt.dtype == torch.int64 and len(src) == len(tgt) == n
            cost = oracle_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
            best, best_total = brute_force_assignment(cost, queries, n)
            total = sum(cost[int(q)][int(j)] for q, j in zip(src, tgt))
            assert total == pytest.approx(best_total, abs=1e-4)
            assert {(int(q), int(j)) for q, j in zip(src, tgt)} == {(q, j) for j, q in enumerate(best)}


def test_matcher_batched_cost_matrix_equals_per_element_cost():
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(COSTS)
    logits, boxes = torch.randn(2, 5, 3, generator=g), random_cxcywh((2, 5), g)
    targets = make_targets([2, 3], 3, g)
    labels = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    cost = matcher.cost_matrix(logits, boxes, labels, tgt_boxes)
    assert cost.shape == (2, 5, 5)
    for b in range(2):
        expected = torch.tensor(oracle_cost(logits[b], boxes[b], labels, tgt_boxes), dtype=torch.float32)
        torch.testing.assert_close(cost[b], expected, atol=1e-4, rtol=1e-4)


def test_matcher_gives_empty_indices_for_images_without_targets():
    g = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher(COSTS)
    outputs = {"pred_logits": torch.randn(3, 5, 2, generator=g), "pred_boxes": random_cxcywh((3, 5), g)}
    for counts in ([0, 0, 0], [0, 2, 0]):
        indices = matcher(outputs, make_targets(counts, 2, g))["indices"]
        for (src, tgt), n in zip(indices, counts):
            assert src.dtype == tgt.dtype == torch.int64 and len(src) == len(tgt) == n


def test_matcher_rejects_misspelled_cost_weights_and_nonfinite_predictions():
    with pytest.raises(KeyError, match="cost_bbox"):
        HungarianMatcher({"cost_class": 2, "cost_box": 5, "cost_giou": 2})
    matcher = HungarianMatcher(COSTS)
    g = torch.Generator().manual_seed(3)
    boxes = random_cxcywh((1, 3), g)
    boxes[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        matcher({"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": boxes}, make_targets([1], 2, g))


# ----------------------------------------------------------------------------- criterion
def expected_keys(num_layers, with_dn):
    suffixes = [""] + [f"_aux_{i}" for i in range(num_layers - 1)] + ["_enc_0"]
    if with_dn:
        suffixes += [f"_dn_{i}" for i in range(num_layers)]
    return {k + s for s in suffixes for k in WEIGHTS}


@pytest.mark.parametrize("counts", [[2, 3, 1], [0, 2, 0], [0, 0, 0]], ids=["full", "mixed", "no_boxes"])
def test_criterion_returns_every_term_finite_with_gradients(counts):
    g = torch.Generator().manual_seed(4)
    num_classes, num_layers = 3, 3
    targets = make_targets(counts, num_classes, g)
    dn_meta, num_dn = denoising_meta(counts, num_group=2)
    outputs = make_outputs(len(counts), 6, num_classes, g, num_layers, dn_meta, num_dn)
    losses = make_criterion(num_classes)(outputs, targets)
    assert set(losses) == expected_keys(num_layers, with_dn=True)
    for key, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert value.requires_grad, key
    if sum(counts) == 0:
        assert all(float(v.detach()) == 0.0 for k, v in losses.items() if "bbox" in k or "giou" in k)
    sum(losses.values()).backward()
    leaves = [outputs] + outputs["aux_outputs"] + outputs["enc_aux_outputs"] + outputs["dn_aux_outputs"]
    for layer in leaves:
        assert torch.isfinite(layer["pred_logits"].grad).all() and layer["pred_logits"].grad.abs().sum() > 0
        assert torch.isfinite(layer["pred_boxes"].grad).all()
        if sum(counts) > 0:
            assert layer["pred_boxes"].grad.abs().sum() > 0
        else:
            assert layer["pred_boxes"].grad.abs().sum() == 0


def test_criterion_box_losses_match_hand_computed_values():
    # queries 0 are near the targets and win the matching; queries 1 are far away
    far = [0.1, 0.1, 0.05, 0.05]
    outputs = {"pred_logits": torch.zeros(2, 2, 2),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], far], [[0.6, 0.5, 0.2, 0.2], far]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
    criterion = make_criterion(2, losses=("boxes",))
    single = criterion({k: v[:1] for k, v in outputs.items()}, targets[:1])
    assert float(single["loss_bbox"]) == 0.0 and float(single["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    losses = criterion(outputs, targets)
    # image 1: |0.6-0.5| + |0.2-0.3| = 0.2; weight 5; num_boxes 2
    assert float(losses["loss_bbox"]) == pytest.approx(5 * 0.2 / 2, abs=1e-6)
    # image 1: xyxy [.5,.4,.7,.6] vs [.4,.35,.6,.65]: IoU .02/.08, hull .09 -> GIoU .25 - .01/.09
    giou = 0.25 - 0.01 / 0.09
    assert float(losses["loss_giou"]) == pytest.approx(2 * (1 - giou) / 2, abs=1e-5)


def test_criterion_vfl_matches_hand_computed_value():
    # logits 0 -> p = 0.5. Query 0 is matched to the label-1 target with IoU 0.04/0.08 = 0.5.
    outputs = {"pred_logits": torch.zeros(1, 2, 2),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    losses = make_criterion(2, losses=("vfl",))(outputs, targets)
    # positive: weight 0.5 * BCE(p=.5, t=.5) = 0.5 ln2; three negatives: 0.75 * 0.5**2 * ln2 each
    expected = (0.5 + 3 * VFL_ALPHA * 0.25) * math.log(2)
    assert float(losses["loss_vfl"]) == pytest.approx(expected, rel=1e-5)


def oracle_vfl(logits, boxes, targets, indices, num_boxes):
    """Per-element varifocal loss (python loops), normalised by num_boxes."""
    positives = {}
    for b, (src, tgt) in enumerate(indices):
        for q, j in zip(src.tolist(), tgt.tolist()):
            iou = float(tvops.box_iou(tvops.box_convert(boxes[b, q:q + 1], "cxcywh", "xyxy"),
                                      tvops.box_convert(targets[b]["boxes"][j:j + 1], "cxcywh", "xyxy"))[0, 0])
            positives[(b, q, int(targets[b]["labels"][j]))] = iou
    total = 0.0
    batch, queries, classes = logits.shape
    for b, q, c in itertools.product(range(batch), range(queries), range(classes)):
        p = 1.0 / (1.0 + math.exp(-float(logits[b, q, c])))
        if (b, q, c) in positives:
            s = positives[(b, q, c)]
            total += -s * (s * math.log(p) + (1 - s) * math.log(1 - p))
        else:
            total += VFL_ALPHA * p ** VFL_GAMMA * -math.log(1 - p)
    return total / num_boxes


def test_criterion_vfl_matches_per_element_oracle_on_random_case():
    g = torch.Generator().manual_seed(5)
    targets = make_targets([2, 0, 3], 4, g)
    targets[0]["boxes"][0] = torch.tensor([0.5, 0.5, 0.3, 0.3])
    logits, boxes = torch.randn(3, 4, 4, generator=g), random_cxcywh((3, 4), g)
    boxes[0, 2] = torch.tensor([0.52, 0.5, 0.3, 0.25])   # a real overlap for one matched pair
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.zeros(0, dtype=torch.long),) * 2,
               (torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1]))]
    criterion = make_criterion(4, losses=("vfl",), matcher=FixedMatcher(indices))
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert float(losses["loss_vfl"]) == pytest.approx(oracle_vfl(logits, boxes, targets, indices, 5), rel=1e-5)


def test_criterion_zero_box_batch_normalises_by_one():
    g = torch.Generator().manual_seed(6)
    targets = make_targets([0, 0], 3, g)
    logits, boxes = torch.randn(2, 4, 3, generator=g), random_cxcywh((2, 4), g)
    losses = make_criterion(3)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    empty = (torch.zeros(0, dtype=torch.long),) * 2
    assert float(losses["loss_vfl"]) == pytest.approx(oracle_vfl(logits, boxes, targets, [empty] * 2, 1),
                                                      rel=1e-5)
    assert float(losses["loss_bbox"]) == 0.0 and float(losses["loss_giou"]) == 0.0


def test_criterion_vfl_does_not_backpropagate_into_boxes():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    boxes = random_cxcywh((2, 5), g).requires_grad_()
    losses = make_criterion(3)({"pred_logits": logits, "pred_boxes": boxes}, make_targets([2, 1], 3, g))
    losses["loss_vfl"].backward(retain_graph=True)
    assert boxes.grad is None and logits.grad.abs().sum() > 0
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert boxes.grad.abs().sum() > 0


def test_criterion_denoising_uses_group_major_positive_indices_and_group_normaliser():
    counts, num_group = [2, 1], 2
    g = torch.Generator().manual_seed(8)
    targets = make_targets(counts, 3, g)
    dn_meta, num_dn = denoising_meta(counts, num_group)     # image 0: [0, 1, 4, 5]; image 1: [0, 4]
    dn_boxes = random_cxcywh((2, num_dn), g)
    for b, positive in enumerate(dn_meta["dn_positive_idx"]):
        dn_boxes[b, positive] = targets[b]["boxes"].repeat(num_group, 1)
    outputs = make_outputs(2, 4, 3, g, num_layers=1)
    outputs.pop("enc_aux_outputs")
    outputs["dn_meta"] = dn_meta
    outputs["dn_aux_outputs"] = [{"pred_logits": torch.randn(2, num_dn, 3, generator=g), "pred_boxes": dn_boxes}]
    criterion = make_criterion(3, losses=("boxes",))
    losses = criterion(outputs, targets)
    assert float(losses["loss_bbox_dn_0"]) == 0.0
    assert float(losses["loss_giou_dn_0"]) == pytest.approx(0.0, abs=1e-6)
    shifted = dn_boxes.clone()
    shifted[0, 5, 0] += 0.1                                  # group 1 copy of image 0's target 1
    outputs["dn_aux_outputs"][0]["pred_boxes"] = shifted
    losses = criterion(outputs, targets)
    assert float(losses["loss_bbox_dn_0"]) == pytest.approx(5 * 0.1 / (3 * num_group), rel=1e-4)


def test_criterion_denoising_rejects_positive_indices_inconsistent_with_targets():
    g = torch.Generator().manual_seed(9)
    dn_meta, num_dn = denoising_meta([2, 1], 2)
    outputs = make_outputs(2, 4, 3, g, num_layers=1, dn_meta=dn_meta, dn_queries=num_dn)
    with pytest.raises(ValueError, match="dn_positive_idx"):
        make_criterion(3)(outputs, make_targets([2, 2], 3, g))


def test_criterion_aux_and_encoder_terms_equal_main_terms_of_those_outputs():
    g = torch.Generator().manual_seed(10)
    targets = make_targets([3, 1], 3, g)
    outputs = make_outputs(2, 6, 3, g, num_layers=3)
    criterion = make_criterion(3)
    losses = criterion(outputs, targets)
    for suffix, layer in [("_aux_0", outputs["aux_outputs"][0]), ("_aux_1", outputs["aux_outputs"][1]),
                          ("_enc_0", outputs["enc_aux_outputs"][0])]:
        alone = criterion(layer, targets)
        for key in WEIGHTS:
            torch.testing.assert_close(losses[key + suffix], alone[key])


def test_criterion_class_agnostic_encoder_uses_one_class_and_zero_labels():
    g = torch.Generator().manual_seed(11)
    targets = make_targets([2, 3], 3, g)
    outputs = make_outputs(2, 6, 3, g, num_layers=2, enc_classes=1)
    losses = make_criterion(3)(outputs, targets)
    enc = outputs["enc_aux_outputs"][0]
    zero_label_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    alone = make_criterion(1)(enc, zero_label_targets)
    for key in WEIGHTS:
        torch.testing.assert_close(losses[key + "_enc_0"], alone[key])
    outputs["enc_meta"] = {"class_agnostic": False}
    with pytest.raises(ValueError, match="enc_aux_outputs"):
        make_criterion(3)(outputs, targets)


def test_criterion_num_boxes_is_mean_over_ranks(monkeypatch):
    g = torch.Generator().manual_seed(12)
    targets = make_targets([2, 2], 3, g)
    outputs = {"pred_logits": torch.randn(2, 5, 3, generator=g), "pred_boxes": random_cxcywh((2, 5), g)}
    criterion = make_criterion(3)
    local = criterion(outputs, targets)
    # pretend a second rank holds 8 boxes: mean over 2 ranks = (4 + 8) / 2 = 6 instead of 4
    monkeypatch.setattr(criterion_module, "all_reduce_sum", lambda t: t + 8)
    monkeypatch.setattr(criterion_module, "get_world_size", lambda: 2)
    shared = criterion(outputs, targets)
    for key in WEIGHTS:
        torch.testing.assert_close(shared[key], local[key] * 4 / 6)


def test_criterion_rejects_unknown_losses_and_mismatched_weights():
    matcher = HungarianMatcher(COSTS)
    with pytest.raises(KeyError, match="focal"):
        RTDETRCriterionv2(matcher, WEIGHTS, ["vfl", "boxes", "focal"])
    with pytest.raises(KeyError, match="loss_giou"):
        RTDETRCriterionv2(matcher, {"loss_vfl": 1, "loss_bbox": 5}, ["vfl", "boxes"])
    with pytest.raises(KeyError, match="loss_gio"):
        RTDETRCriterionv2(matcher, {**WEIGHTS, "loss_gio": 2}, ["vfl", "boxes"])


class ReversingMatcher(HungarianMatcher):
    """A user's matcher that overrides only forward: Hungarian, then every image's pairs in reverse order
    of targets (a permutation that changes the loss), counting its calls."""
    calls = 0

    def forward(self, outputs, targets):
        ReversingMatcher.calls += 1
        indices = super().forward(outputs, targets)["indices"]
        return {"indices": [(q, t.flip(0)) for q, t in indices]}


class BatchingMatcher(ReversingMatcher):
    def match_many(self, calls, names=()):  # batches and reverses, as its forward does
        return [{"indices": [(q, t.flip(0)) for q, t in r["indices"]]}
                for r in HungarianMatcher.match_many(self, calls, names)]


def test_a_matcher_overriding_only_forward_is_called_for_every_layer_not_bypassed_by_match_many():
    assert criterion_module.batches_its_forward(HungarianMatcher(COSTS))
    assert not criterion_module.batches_its_forward(ReversingMatcher(COSTS))
    assert criterion_module.batches_its_forward(BatchingMatcher(COSTS))  # it batches its own forward
    assert not criterion_module.batches_its_forward(FixedMatcher([]))
    g = torch.Generator().manual_seed(3)
    targets = make_targets([3, 2], 4, g)
    outputs = make_outputs(2, 6, 4, g, num_layers=2)
    ReversingMatcher.calls = 0
    losses = make_criterion(4, matcher=ReversingMatcher(COSTS))(outputs, targets)
    assert ReversingMatcher.calls == 3  # final, one aux, one encoder layer
    # the same loss as the stand-in matcher given the reversed pairs of the final layer
    reversed_final = ReversingMatcher(COSTS)(outputs, targets)["indices"]
    reference = make_criterion(4, matcher=FixedMatcher(reversed_final))(
        {k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)
    torch.testing.assert_close(losses["loss_bbox"], reference["loss_bbox"])
    assert not torch.allclose(losses["loss_bbox"], make_criterion(4)(outputs, targets)["loss_bbox"])
