"""Box ops: conversions, paired IoU and inverse sigmoid against torchvision.ops and hand-computed values."""
import pytest
import torch
import torchvision.ops as tvops

from src.zoo.rtdetr.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, elementwise_box_iou,
                                    generalized_box_iou, inverse_sigmoid)


def random_cxcywh(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
    return torch.cat([centre, size], dim=-1)


def test_cxcywh_to_xyxy_matches_hand_computed_corners():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.1]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.7, 0.5, 0.8]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), boxes)


def test_conversions_round_trip_and_agree_with_torchvision():
    g = torch.Generator().manual_seed(0)
    cxcywh = random_cxcywh(64, g)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, tvops.box_convert(cxcywh, "cxcywh", "xyxy"))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    # leading batch dimensions are kept
    batched = cxcywh.view(4, 16, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(batched), xyxy.view(4, 16, 4))


def test_elementwise_box_iou_equals_diagonal_of_torchvision_box_iou():
    g = torch.Generator().manual_seed(1)
    boxes1 = box_cxcywh_to_xyxy(random_cxcywh(50, g))
    boxes2 = box_cxcywh_to_xyxy(random_cxcywh(50, g))
    boxes2[:10] = boxes1[:10]                              # identical pairs: IoU 1
    expected = torch.diag(tvops.box_iou(boxes1, boxes2))
    got = elementwise_box_iou(boxes1, boxes2)
    assert got.shape == (50,)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[:10], torch.ones(10))
    assert (got[10:] < 1).all() and (got >= 0).all()


def test_elementwise_box_iou_hand_computed_and_degenerate_boxes():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.5, 0.5, 0.5, 0.5]])
    # overlap 1 / union 7; disjoint 0; two zero-area boxes give 0, not NaN
    torch.testing.assert_close(elementwise_box_iou(boxes1, boxes2), torch.tensor([1 / 7, 0.0, 0.0]))


def test_reexported_pairwise_ious_are_torchvision():
    assert box_iou is tvops.box_iou and generalized_box_iou is tvops.generalized_box_iou
    g = torch.Generator().manual_seed(2)
    boxes = box_cxcywh_to_xyxy(random_cxcywh(8, g))
    torch.testing.assert_close(torch.diag(generalized_box_iou(boxes, boxes)), torch.ones(8))


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite_at_0_and_1():
    x = torch.linspace(-6, 6, 25)
    torch.testing.assert_close(inverse_sigmoid(torch.sigmoid(x)), x, atol=1e-3, rtol=1e-3)
    edges = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    assert torch.isfinite(edges).all()
    assert edges[0] < -10 and edges[1] > 10


def _box_pairs():
    """Paired xyxy boxes covering overlap, containment, disjoint (both axes, one axis), shared edge, identity and
    zero-area boxes, plus 200 random pairs."""
    hand = torch.tensor([
        [[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]],    # overlap
        [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 3.0]],    # containment
        [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]],    # disjoint on both axes
        [[0.0, 0.0, 1.0, 5.0], [2.0, 1.0, 3.0, 2.0]],    # overlapping in y, disjoint in x
        [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]],    # a shared edge
        [[0.2, 0.3, 0.6, 0.9], [0.2, 0.3, 0.6, 0.9]],    # identical
        [[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]],    # zero area inside another box
    ])
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, 2, generator=g)
    wh = torch.rand(200, 2, 2, generator=g) * 0.5
    rand = torch.cat([xy, xy + wh], -1)
    return torch.cat([hand, rand]).double().unbind(1)


def test_elementwise_giou_loss_equals_torchvision_values_and_gradients():
    from src.zoo.rtdetr.box_ops import elementwise_giou_loss

    a, b = _box_pairs()
    ours = [t.clone().requires_grad_() for t in (a, b)]
    ref = [t.clone().requires_grad_() for t in (a, b)]
    got = elementwise_giou_loss(*ours, eps=1e-7)
    want = tvops.generalized_box_iou_loss(*ref, reduction="none", eps=1e-7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[:7].tolist() == pytest.approx([1 - (1 / 7 - 2 / 9), 1 - 2 / 16, 1 - (0 - 7 / 9), 1 - (0 - 9 / 15),
                                              1.0, 0.0, 1 - 0.0], abs=1e-6)
    weights = torch.rand(len(got), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    # the shared-edge pair (index 4) is where clamp and torchvision's mask differ (a side of exactly 0)
    keep = torch.ones(len(got), dtype=torch.bool)
    keep[4] = False
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.grad[keep], r.grad[keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_giou_loss_upcasts_half_precision_as_torchvision_does(dtype):
    from src.zoo.rtdetr.box_ops import elementwise_giou_loss

    a, b = (t.to(dtype) for t in _box_pairs())
    got = elementwise_giou_loss(a, b, eps=1e-9)  # 1e-9 is 0 in float16: a zero-area pair would be nan there
    want = tvops.generalized_box_iou_loss(a, b, reduction="none", eps=1e-9)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.isfinite(got).all()
