"""The ResNet stem's 3x3 / stride 2 / padding 1 max pool, exact and fast on a CPU without autograd.

PyTorch's CPU ``max_pool2d`` always computes the argmax indices too (``max_pool2d_with_indices``) and is slow on
channels-first maps: 28 ms for the [1, 64, 320, 320] stem map of a 640x640 image on a 2-core AMD EPYC
(2026-12-04), 6 % of the whole RT-DETRv2-R18 forward. The same maximum, taken separably with strided slices and
``torch.maximum``, takes about 5 ms there (``python -m bench.stem_pool_bench``) and gives the same values (a
maximum is exact; NaN propagates in both; of a tied -0.0 and +0.0 either may come out, as they compare equal).

Only for inference: where a gradient is needed, the autograd of ``torch.maximum`` would split it between tied
inputs, while max pooling gives it to one (ties are common after a ReLU), so those calls keep ``F.max_pool2d``;
so do graph export (one ``MaxPool`` node), other devices and channels-last maps (their kernels are fast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.nn.tracing import tracing_graph


def _every_other(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    """The view of ``x`` at indices start, start + 2, ... along ``dim``."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, None, 2)
    return x[tuple(index)]


def _max3_stride2(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over windows of 3 at stride 2 along ``dim`` with one -inf of padding on each side:
    [..., L, ...] -> [..., ceil(L / 2), ...]; output i covers inputs 2i - 1, 2i, 2i + 1."""
    out = _every_other(x, dim, 0).clone()                                # inputs 2i: ceil(L / 2)
    odd = _every_other(x, dim, 1)                                        # inputs 2i + 1: floor(L / 2)
    n_odd, n_out = odd.shape[dim], out.shape[dim]
    if n_odd == 0:
        return out
    head = out.narrow(dim, 0, n_odd)
    torch.maximum(head, odd, out=head)                                   # with 2i + 1
    tail = out.narrow(dim, 1, n_out - 1)
    torch.maximum(tail, odd.narrow(dim, 0, n_out - 1), out=tail)         # with 2i - 1 (i >= 1)
    return out


def stem_max_pool(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)``: [N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)],
    computed separably for a contiguous (channels-first) floating-point map on a CPU when no gradient is needed
    (the same values), else by ``F.max_pool2d``."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    own_path = (x.device.type == "cpu" and not needs_grad and x.dim() == 4 and x.is_floating_point()
                and x.numel() > 0 and x.is_contiguous()  # channels-last: PyTorch's own kernel is the fast one
                and not (tracing_graph() or torch.jit.is_scripting()))
    if not own_path:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    return _max3_stride2(_max3_stride2(x, 3), 2)
