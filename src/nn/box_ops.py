"""The one box-ops module (below the zoo: data and models use it). Boxes are [..., 4] tensors; torchvision.ops
does the maths where it has it."""
import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou  # noqa: F401  (re-exported)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def side_product(wh: Tensor) -> Tensor:
    """``wh[..., 0] * wh[..., 1]``: [..., 2] -> [...]. Not ``prod(-1)``, whose backward checks for zeros on the
    host (a device sync per call on a GPU, 7 per training step in the GIoU loss: H200, 2026-12-04)."""
    return wh[..., 0] * wh[..., 1]


def paired_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection area of paired xyxy boxes: [N, 4] x [N, 4] -> [N] (0 for disjoint pairs, no mask)."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    return side_product((rb - lt).clamp(min=0))


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of paired xyxy boxes: [N, 4] x [N, 4] -> [N] (torchvision only has the pairwise matrix)."""
    inter = paired_intersection(boxes1, boxes2)
    area1 = side_product((boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0))
    area2 = side_product((boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0))
    return inter / (area1 + area2 - inter).clamp(min=eps)


def elementwise_giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of paired xyxy boxes: [N, 4] x [N, 4] -> [N]; the values of torchvision's
    ``generalized_box_iou_loss(reduction="none")`` without its boolean-mask indexing, which on a GPU makes the host
    wait for the device five times in the forward pass and five more in the backward pass (``nonzero``): the
    intersection is ``clamp(w, 0) * clamp(h, 0)`` instead of ``w * h`` where both are positive, else 0. Gradients
    differ only where a side is exactly 0 (then torchvision's is 0)."""
    if boxes1.dtype not in (torch.float32, torch.float64):  # as torchvision: half precision and integers upcast
        boxes1 = boxes1.float()
    if boxes2.dtype not in (torch.float32, torch.float64):
        boxes2 = boxes2.float()
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    inter = paired_intersection(boxes1, boxes2)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (inter / (union + eps) - (hull - union) / (hull + eps))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
