"""A trained detector ready to run outside the trainer: load config + weights, the RT-DETR deployment
interface, and DSET's state at deployment (pruning at the config's keep ratio, as after warmup).

Used by tools/export_onnx.py, tools/infer.py and bench/latency_bench.py.

    cfg, model, post = load_detector("configs/dset4_r18_ratio0.3.yaml", checkpoint="output/run/best.pth")
    labels, boxes, scores = DeployModel(fuse_for_inference(model), post)(images, orig_target_sizes)
    export(DeployModel(fuse_for_inference(model), post).eval(), "model.onnx", (h, w))   # the ONNX graph
"""
from __future__ import annotations

import warnings

from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from src.core.config import YAMLConfig
from src.data.classes import ClassList, match_classes
from src.misc.checkpoint import extract_state_dict, load_checkpoint, load_matching_weights
from src.nn.backbone.common import fold_conv_norm
from src.nn.tracing import tracing_graph
from src.zoo.rtdetr.hybrid_encoder import RepVggBlock
from src.zoo.rtdetr.moe import MOE_DISPATCHES, MoEFFN
from src.zoo.rtdetr.patch_level_pruning import PatchLevelPruner

__all__ = ["load_detector", "fuse_for_inference", "add_fuse_option", "DeployModel", "inference_memory_format",
           "to_memory_format", "set_moe_dispatch",
           "pruning_summary", "export", "write_class_metadata"]


def load_detector(config: str, overrides: Sequence[str] | Mapping = (), checkpoint: Optional[str] = None,
                  random_weights: bool = False, trusted: bool = False,
                  device: str = "cpu") -> Tuple[YAMLConfig, nn.Module, nn.Module]:
    """Build the config's model and postprocessor in eval mode with the checkpoint's weights.

    The weights are the checkpoint's EMA when it has one (as the trainer evaluates), loaded strictly: any
    missing, unexpected or shape-mismatched key is an error. Without a checkpoint ``random_weights=True``
    is required (tests, benchmarks), so random weights are never used by accident.
    Pruners are left without an epoch, i.e. at the end of their warmup schedule (``keep_ratio``).

    ``overrides``: ``-u`` strings or a nested dict (src/core/run_config.py). Returns (cfg, model,
    postprocessor), both modules on ``device`` in eval mode. ``cfg.checkpoint_classes`` is the training class
    list the checkpoint stores (`src.data.classes.ClassList`), or None (random weights, or a checkpoint written
    before classes were stored).
    """
    if (checkpoint is None) == (not random_weights):
        raise ValueError("load_detector: give a checkpoint (-r CKPT) or, for tests and benchmarks only, "
                         "random_weights=True (--random-weights); not both, not neither")
    cfg = YAMLConfig(config, overrides=dict(overrides) if isinstance(overrides, Mapping) else list(overrides))
    model, post = cfg.model, cfg.postprocessor
    cfg.checkpoint_classes = None
    if checkpoint is not None:
        raw = load_checkpoint(checkpoint, trusted=trusted)
        if isinstance(raw, dict) and raw.get("classes"):
            cfg.checkpoint_classes = ClassList.from_records(raw["classes"])
        state = extract_state_dict(raw)
        try:
            load_matching_weights(model, state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{checkpoint}: weights do not fit the model of {config} (same config and -u "
                               f"overrides as in training?)\n{e}") from None
    for m in model.modules():
        if isinstance(m, PatchLevelPruner):
            m.epoch = None  # schedule finished: keep_ratio
    return cfg, model.to(device).eval(), post.to(device).eval()


def set_moe_dispatch(model: nn.Module, dispatch: str) -> int:
    """Set the dispatch (``MOE_DISPATCHES``: auto / sorted / dense) of every MoEFFN of ``model``. Graph export
    traces ``dense`` as dense and the others as the gather dispatch (MoEFFN.resolved_dispatch). Returns the
    number of MoE layers set."""
    if dispatch not in MOE_DISPATCHES:
        raise ValueError(f"set_moe_dispatch: dispatch={dispatch!r} is not one of {list(MOE_DISPATCHES)}")
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    for m in layers:
        m.dispatch = dispatch
    return len(layers)


def pruning_summary(model: nn.Module) -> List[str]:
    """One line per pruner: what the deployed graph does at that level."""
    lines = []
    for i, m in enumerate(m for m in model.modules() if isinstance(m, PatchLevelPruner)):
        if m.prune_in_eval:
            lines.append(f"pruner {i}: top-k of {m.patch_size}x{m.patch_size} patches at keep_ratio "
                         f"{m.current_keep_ratio} (min_patches {m.min_patches}), gather, attention, scatter")
        else:
            lines.append(f"pruner {i}: prune_in_eval is false, every token is kept (as in evaluation)")
    return lines


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Reparameterize ``model`` (in eval mode) in place for deployment and return it: every RepVGG block of the
    encoder becomes one 3x3 conv (as the official ``model.deploy()``), and every conv-norm layer folds its norm
    into the conv (backbone, the encoder's and decoder's input projections, CCFM). Outputs equal the unfused
    model's within float rounding (``tests/test_deploy_fusion.py``). In RT-DETRv2-R18, 69 convolutions and 69
    norms become 57 convolutions, so eager PyTorch dispatches about 90 fewer operators per image
    (``bench/op_count.py``: 614 -> 521 at 256x256; the official deploy model 557). The state-dict keys change:
    load weights first. A module in training mode that has something to fold is refused (``fold_conv_norm``)."""
    for m in model.modules():
        if isinstance(m, RepVggBlock):
            m.reparameterize()
    for m in list(model.modules()):
        fold_conv_norm(m)
    return model


def add_fuse_option(parser) -> None:
    """``--fuse / --no-fuse`` (default on) of the tools that deploy a model (tools/infer.py, tools/export_onnx.py)."""
    import argparse

    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="merge RepVGG blocks and fold conv + norm for deployment (default; the same detections "
                             "within float rounding, fewer operators); --no-fuse runs the model as trained, as the "
                             "training evaluation does")


def inference_memory_format(device) -> torch.memory_format:
    """The memory format a deployed model runs in on ``device``: ``channels_last`` on a CPU, where oneDNN's
    convolutions then need no layout reorder of their inputs and weights (the fused DSET keep 0.3 model at
    640x640, batch 1, 2-core AMD EPYC, 2026-12-04: 397 against 422 ms end to end; the same detections within
    float rounding, ``tests/test_deploy_fusion.py``), the default contiguous layout elsewhere (on a GPU not
    measured yet)."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` with its 4-d weights (convolutions) in ``memory_format``, in place; the same maths."""
    return model.to(memory_format=memory_format)


class DeployModel(nn.Module):
    """The official RT-DETR deployment interface around a detector and its postprocessor.

    forward(images [N, 3, H, W] float32 in [0, 1], orig_target_sizes [N, 2] int64 as (w, h), the size
    the normalised boxes are scaled to) -> (labels int64 [N, K], boxes [N, K, 4] xyxy pixels,
    scores [N, K]), K the postprocessor's num_top_queries.

    ``memory_format``: the layout the convolutions run in (``inference_memory_format(device)``: channels_last
    on a CPU); the weights are converted here (in place), the images in ``forward``. None (default): the model
    and the images are left as they are. A traced graph (``export``) has no layout: the graph is the same
    either way.
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module,
                 memory_format: Optional[torch.memory_format] = None):
        super().__init__()
        self.model = model if memory_format is None else to_memory_format(model, memory_format)
        self.postprocessor = postprocessor
        self.memory_format = memory_format
        for m in model.modules():  # the training-time routing statistics: nobody reads them here
            if isinstance(m, MoEFFN):
                m.record_statistics = False

    def forward(self, images: Tensor, orig_target_sizes: Tensor):
        if self.memory_format is not None and not tracing_graph():
            images = images.contiguous(memory_format=self.memory_format)
        outputs = self.model(images)
        return self.postprocessor.forward_batched(outputs, orig_target_sizes)


# ---------------------------------------------------------------- ONNX (tools/export_onnx.py, bench/latency_bench.py)
OPSET = 17
INPUT_NAMES = ["images", "orig_target_sizes"]
OUTPUT_NAMES = ["labels", "boxes", "scores"]


def export(deploy: DeployModel, out: str, hw: tuple) -> None:
    """Trace ``deploy`` at batch 1 and write the ONNX file (dynamic batch axis)."""
    images = torch.rand(1, 3, *hw)
    sizes = torch.tensor([[hw[1], hw[0]]], dtype=torch.int64)
    dynamic = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # strided Slice: left to the runtime
        torch.onnx.export(deploy, (images, sizes), out, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def write_class_metadata(path: str, classes) -> None:
    """Store the training classes in the ONNX file's metadata (key 'classes': json [{label, name,
    category_id}]), so a deployment names the labels as training did."""
    import json

    import onnx

    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = "classes", json.dumps(classes.to_records())
    onnx.save(model, path)
