"""The one box-ops module (below the zoo: data and models use it). Boxes are [..., 4] tensors; torchvision.ops
does the maths where it has it."""
import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou  # noqa: F401  (re-exported)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of paired xyxy boxes: [N, 4] x [N, 4] -> [N] (torchvision only has the pairwise matrix)."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
