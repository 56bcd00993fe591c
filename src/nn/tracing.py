"""Whether the running forward is being recorded as a graph (``torch.jit.trace``, ``torch.onnx.export``).

A traced graph keeps the operators a forward calls and freezes its Python-side decisions, so code that picks a
faster eager path (host-read sizes, memory layouts, hand-written kernels) takes the graph-friendly one here.
"""
from __future__ import annotations

import torch


def tracing_graph() -> bool:
    """True inside ``torch.jit.trace`` or ``torch.onnx.export`` (the TorchScript exporter traces)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
