"""src/nn/rows.py: row gathers / scatters equal torch.gather / Tensor.scatter with expanded indices, in values,
in gradients and in onnxruntime (as whole-row ONNX Gather / ScatterND, no *Elements op)."""
from __future__ import annotations

import pytest
import torch

from src.nn.rows import gather_rows, scatter_rows


def _case(seed=0, b=3, n=11, k=4, c=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])  # distinct per item
    rows = torch.randn(b, k, c, generator=g)
    return x, index, rows


def test_gather_rows_equals_torch_gather_in_values_and_gradients():
    x, index, _ = _case()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = gather_rows(a, index)
    ref = torch.gather(b, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    assert torch.equal(out, ref)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_scatter_rows_equals_tensor_scatter_in_values_and_gradients():
    x, index, rows = _case(1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra, rb = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    out = scatter_rows(xa, index, ra)
    ref = xb.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rb)
    assert torch.equal(out, ref)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ra.grad, rb.grad)


def test_row_ops_export_as_row_gather_and_scatter_and_generalise_to_other_batches(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    class Both(torch.nn.Module):
        def forward(self, x, index, rows):
            return scatter_rows(x, index, rows), gather_rows(x, index)

    x, index, rows = _case(2, b=1)
    path = str(tmp_path / "rows.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Both(), (x, index, rows), path, input_names=["x", "index", "rows"],
                          output_names=["scattered", "gathered"], opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "B"} for name in ("x", "index", "rows", "scattered", "gathered")})
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "ScatterND" in ops and "Gather" in ops and not ops & {"ScatterElements", "GatherElements"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, index, rows = _case(3, b=4)
    scattered, gathered = session.run(None, {"x": x.numpy(), "index": index.numpy(), "rows": rows.numpy()})
    assert torch.equal(torch.from_numpy(scattered), x.scatter(1, index.unsqueeze(-1).expand(-1, -1, 5), rows))
    assert torch.equal(torch.from_numpy(gathered), torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, 5)))


def test_scatter_rows_with_repeats_only_into_a_dropped_scratch_row_equals_the_masked_scatter():
    """The DSET encoder's non-whole patch grids: slots off the map all go to a scratch row n that is dropped;
    the kept rows are exactly Tensor.scatter's, and the dropped slots' rows get no gradient."""
    x, index, rows = _case(4, b=2, n=9, k=5)
    valid = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    target = torch.where(valid, index, torch.full_like(index, 9))
    padded = torch.cat([x, x.new_zeros(2, 1, 5)], 1)
    rows = rows.clone().requires_grad_()
    out = scatter_rows(padded, target, rows)[:, :9]
    ref = x.clone()
    for b in range(2):  # per-row loop oracle
        for k in range(5):
            if valid[b, k]:
                ref[b, index[b, k]] = rows[b, k].detach()
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    assert torch.equal(rows.grad, valid.unsqueeze(-1).expand(-1, -1, 5).float())
