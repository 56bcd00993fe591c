"""A deployed detector replayed as one CUDA graph: the same kernels, one launch instead of hundreds.

At batch 1 on a large GPU the detector is launch-bound: an H200 runs the official RT-DETRv2-R18's 60 GFLOPs at
640x640 in 12.4 ms of PyTorch eager mode and in 3.3 ms as a graph (2026-12-04, docs/performance.md), the rest
being the host launching about 500 kernels one by one. A CUDA graph records the kernels of one forward once and
replays them all with a single launch, so the time left is the GPU's own work.

    graphed = GraphedDetector(DeployModel(fuse_for_inference(model), post), batch=1, hw=(736, 1280))
    labels, boxes, scores = graphed(images, orig_target_sizes)   # images [1, 3, 736, 1280] on cuda

What a graph needs of the forward, and why the deployed RT-DETR / DSET forward has it: no host sync and no
shape that depends on the data (``bench/op_count.py --device cuda`` counts 0 syncs per forward; the pruner keeps
a number of patches fixed by the input size; an MoE layer's ``auto`` dispatch is dense on CUDA; the
postprocessor's top-k is fixed). Inputs of another shape, dtype or device than the captured ones are refused:
capture another ``GraphedDetector`` for them. Outputs are copied out of the graph's memory by default, so a
later call cannot overwrite what an earlier one returned.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["GraphedDetector"]

_AUTOCAST_DTYPES = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GraphedDetector:
    """``deploy`` (forward(images [N, 3, H, W], orig_target_sizes [N, 2] int64) -> tuple of tensors, e.g.
    DeployModel) captured as one CUDA graph for inputs [batch, 3, H, W] float32 on ``device``.

    ``autocast``: None (float32), "float16" or "bfloat16": the forward runs under ``torch.autocast`` (without
    the autocast weight cache, which a graph cannot keep). ``warmup``: eager forwards on a side stream before the
    capture (lazy initialisation, cached positional embeddings, cuDNN / cuBLAS plans).
    """

    def __init__(self, deploy: nn.Module, batch: int, hw: Sequence[int], device: str = "cuda",
                 autocast: Optional[str] = None, warmup: int = 3):
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"GraphedDetector: CUDA graphs need a CUDA device, got device={device!r} "
                               f"(torch.cuda.is_available() = {torch.cuda.is_available()}); run the model "
                               f"eagerly instead")
        if autocast not in _AUTOCAST_DTYPES:
            raise ValueError(f"GraphedDetector: autocast={autocast!r} is not one of {list(_AUTOCAST_DTYPES)}")
        if deploy.training:
            raise ValueError("GraphedDetector: the model is in training mode; call .eval() first (a graph "
                             "replays inference only)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device, self.autocast, self.deploy = dev, autocast, deploy
        h, w = int(hw[0]), int(hw[1])
        with torch.cuda.device(dev):  # every stream, buffer and kernel below on dev, whichever device is current
            self.images = torch.zeros(batch, 3, h, w, device=dev)                   # the graph's input buffers
            self.sizes = torch.tensor([[w, h]] * batch, dtype=torch.int64).to(dev)
            caller = torch.cuda.current_stream(dev)
            side = torch.cuda.Stream(dev)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._forward()
            caller.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(dev)):
                    self.outputs = self._forward()                                  # the graph's output buffers
            except RuntimeError as e:
                torch.cuda.set_stream(caller)  # a failed capture can leave its stream current
                cause = e.__context__ if isinstance(e.__context__, Exception) else e  # the op that broke it
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
                raise RuntimeError(f"GraphedDetector: the forward could not be captured as a CUDA graph: {first} "
                                   f"(a graph needs a forward without host syncs and data-dependent shapes; "
                                   f"run the model eagerly)") from e

    def _forward(self) -> Tuple[Tensor, ...]:
        cast = (torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[self.autocast], cache_enabled=False)
                if self.autocast else contextlib.nullcontext())
        with torch.no_grad(), cast:
            return tuple(self.deploy(self.images, self.sizes))

    def __call__(self, images: Tensor, orig_target_sizes: Tensor, copy: bool = True) -> Tuple[Tensor, ...]:
        """The captured forward on these inputs (same shape, dtype and device as captured). ``copy=False``
        returns the graph's own output tensors, overwritten by the next call (benchmarks)."""
        for name, got, want in (("images", images, self.images), ("orig_target_sizes", orig_target_sizes,
                                                                    self.sizes)):
            if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
                raise ValueError(f"GraphedDetector: {name} is {tuple(got.shape)} {got.dtype} on {got.device}; "
                                 f"the graph was captured for {tuple(want.shape)} {want.dtype} on {want.device} "
                                 f"(capture another GraphedDetector for other shapes)")
        with torch.cuda.device(self.device):
            self.images.copy_(images)
            self.sizes.copy_(orig_target_sizes)
            self.graph.replay()
            return tuple(t.clone() for t in self.outputs) if copy else self.outputs
