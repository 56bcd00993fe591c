"""The official RT-DETRv2 implementation as a latency-bench row, with this repo's weights.

``--official PATH`` of bench/latency_bench.py: PATH is an extracted ``rtdetrv2_pytorch`` folder of
github:lyuwenyu/RT-DETR (it contains ``src/`` and ``configs/``). Its package is also called ``src``, so it is
imported with this repo's ``src`` modules set aside in ``sys.modules`` and put back afterwards (the built
modules keep their own globals; nothing of the official package stays importable). The official model is
built from its R18 config with the number of classes and input size of the row, gets the weights of this
repo's ``plain_p5`` variant (strict load: the state dicts are the same table), and is converted with its own
``deploy()``, as the official tools/export_onnx.py does. ``check_same_outputs`` refuses a comparison whose
detections differ, so a ratio is always between two implementations of the same function.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from src.nn.tracing import tracing_graph

OFFICIAL_CONFIG = "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml"


def _is_src(name: str) -> bool:
    return name == "src" or name.startswith("src.")


@contextlib.contextmanager
def official_package(root: Path) -> Iterator[None]:
    """Inside: ``import src`` is the official package under ``root``; after: this repo's again."""
    ours = {k: v for k, v in sys.modules.items() if _is_src(k)}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if _is_src(k)]:
            del sys.modules[k]
        sys.modules.update(ours)


class OfficialDeployModel(nn.Module):
    """forward(images, orig_target_sizes) -> (labels, boxes, scores): the official deploy interface.
    ``memory_format``: as the official code deploys (contiguous), or channels_last (weights here, images in
    ``forward``) to compare like for like with this repo's CPU rows (``latency_bench --official-channels-last``)."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model, self.postprocessor = model.to(memory_format=memory_format), postprocessor
        self.memory_format = memory_format

    def forward(self, images, orig_target_sizes):
        if not tracing_graph():
            images = images.contiguous(memory_format=self.memory_format)
        return self.postprocessor(self.model(images), orig_target_sizes)


def load_official(root: str, hw, num_classes: int, state_dict: dict, device: str = "cpu",
                  memory_format: torch.memory_format = torch.contiguous_format) -> OfficialDeployModel:
    """The official RT-DETRv2-R18 at input ``hw`` = (h, w) with ``state_dict`` (this repo's plain model)."""
    root_path = Path(root).resolve()
    config = root_path / OFFICIAL_CONFIG
    if not (root_path / "src" / "core").is_dir() or not config.is_file():
        raise FileNotFoundError(f"--official {root}: not an extracted rtdetrv2_pytorch folder (it needs src/core/ "
                                f"and {OFFICIAL_CONFIG}); get it with: git clone "
                                f"https://github.com/lyuwenyu/RT-DETR && use RT-DETR/rtdetrv2_pytorch")
    with official_package(root_path):
        from src.core import YAMLConfig  # the official one
        cfg = YAMLConfig(str(config), num_classes=int(num_classes), eval_spatial_size=[int(hw[0]), int(hw[1])],
                         PResNet={"pretrained": False})
        model, post = cfg.model, cfg.postprocessor
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(f"--official: the official model and this repo's plain_p5 differ in their state dicts: "
                       f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return OfficialDeployModel(model.deploy(), post.deploy(), memory_format).to(device).eval()


def check_same_outputs(official: nn.Module, ours: nn.Module, images, sizes, atol: float = 1e-3) -> float:
    """Largest difference between the two models' detections on ``images``, matched one to one per image: a
    detection of one equals one of the other with the same label, its score within ``atol`` (absolute) and its box
    within ``atol`` of the image size. One to one and not position by position: two computations of the same
    detector in another summation order (another layout, merged RepVGG blocks) can order detections with
    near-equal scores the other way round. A ValueError when no such matching exists (then the rows would compare
    different functions)."""
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        (la, ba, sa), (lb, bb, sb) = official(images, sizes), ours(images, sizes)
    scale = max(1.0, float(sizes.max()))
    worst = 0.0
    for i in range(la.shape[0]):  # per image: [K] labels and scores, [K, 4] boxes
        cost = torch.maximum((sa[i, :, None] - sb[i, None, :]).abs(),
                             (ba[i, :, None] - bb[i, None, :]).abs().amax(-1) / scale).double()
        cost = cost.masked_fill(la[i, :, None] != lb[i, None, :], float("inf"))   # [K, K]
        finite = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, 1e9))
        rows, cols = linear_sum_assignment(finite.numpy())
        worst = max(worst, float(finite[rows, cols].max()))
    if worst > atol:
        raise ValueError(f"--official: the official model's detections differ from plain_p5's with the same weights "
                         f"(largest difference of a matched detection {worst:.2e}, score or box / image size; "
                         f"1e9: a label without a counterpart): the official folder is another version or config "
                         f"than this repo's plain model")
    return worst
