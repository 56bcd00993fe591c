"""src/nn/tracing.py: the one predicate the eager-only paths (MoE dispatch, value projection, stem pool,
deployment layout) use to take their graph-friendly form under tracing and ONNX export."""
from __future__ import annotations

import io

import pytest
import torch

from src.nn.tracing import tracing_graph


class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tracing_graph())
        return x * 2


def test_tracing_graph_is_false_eagerly_and_true_under_trace_and_onnx_export():
    probe, x = Probe(), torch.ones(2)
    probe(x)
    torch.jit.trace(probe, (x,), check_trace=False)
    assert probe.seen == [False, True]
    pytest.importorskip("onnx")
    probe.seen.clear()
    torch.onnx.export(probe, (x,), io.BytesIO(), dynamo=False)
    assert probe.seen and all(probe.seen)
