"""The zoo's box ops are the ones in src/nn/box_ops.py (data transforms need them below the zoo)."""
from src.nn.box_ops import (box_convert, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,  # noqa: F401
                            elementwise_box_iou, elementwise_giou_loss, generalized_box_iou,
                            inverse_sigmoid)
