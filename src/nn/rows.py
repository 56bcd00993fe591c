"""Row gathers and scatters along the token axis of [B, N, C] tensors, moving whole rows.

``torch.gather`` / ``Tensor.scatter`` with an index expanded to [B, K, C] address every element: a graph export
turns them into GatherElements / ScatterElements, which onnxruntime runs element by element (about 1 ms for a
480 x 256 scatter on a 2-core CPU). These fold the batch into the row axis and move rows (ONNX Gather / ScatterND
on [B*N, C]): the same values and the same gradients. A non-contiguous x (e.g. a permuted feature map) with
B > 1 is copied once by the flattening, which torch.gather would not do; at B = 1 it is a view.
"""
from __future__ import annotations

import torch
from torch import Tensor


def flat_row_index(index: Tensor, num_rows: int) -> Tensor:
    """index [B, K] into rows 0..num_rows-1 of each batch item -> [B*K] into the [B*num_rows] flattened rows."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_rows
    return (index + offsets).flatten()


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]``: x [B, N, C], index [B, K] long -> [B, K, C]."""
    num_rows, channels = x.shape[1], x.shape[2]
    return x.flatten(0, 1).index_select(0, flat_row_index(index, num_rows)).reshape(-1, index.shape[1], channels)


def scatter_rows(x: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """x with row ``index[b, k]`` of item b replaced by ``rows[b, k]`` (out of place): x [B, N, C], index [B, K]
    long, rows [B, K, C] -> [B, N, C]. Where an item's index repeats, which of its rows lands is unspecified
    (as for ``Tensor.scatter``); callers send repeats only to a row they drop."""
    num_rows, channels = x.shape[1], x.shape[2]
    out = x.flatten(0, 1).index_put((flat_row_index(index, num_rows),), rows.reshape(-1, channels).to(x.dtype))
    return out.reshape(-1, num_rows, channels)
