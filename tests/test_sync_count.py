"""bench/sync_count.py counts the host reads of a training step, with the line that makes them."""
from __future__ import annotations

import torch

from bench import sync_count
from tests.helpers_tiny_run import make_tiny_dataset, write_tiny_config


def test_the_counter_sees_item_bool_tolist_cpu_and_nonzero_and_nothing_else():
    x = torch.arange(6.0)
    with sync_count.SyncCounter() as c:
        y = (x * 2).sum()
        float(y.item())
        bool(y > 3)
        x.tolist()
        x.cpu()
        torch.nonzero(x)
        x + 1
    kinds = collections_of(c.counts)
    assert kinds == {"_local_scalar_dense": 2, "tolist": 1, "cpu": 1, "nonzero": 1}
    assert all(where.startswith("tests/test_sync_count.py:") for (_, where) in c.counts)
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # restored


def test_the_counter_sees_boolean_mask_indexing_forward_and_backward_but_not_a_masked_fill():
    """On CUDA ``x[mask]`` and ``x[mask] = values`` (and their backward) turn the mask into indices with a host
    wait; on a CPU that happens inside the kernel, so the counter looks at the index arguments instead.
    ``x[mask] = 0.0`` is a masked_fill on CUDA and waits for nothing."""
    x = torch.arange(6.0, requires_grad=True)
    mask = x.detach() > 2
    with sync_count.SyncCounter() as c:
        y = x[mask]                      # index with a mask: 1
        z = torch.zeros(6)
        z[mask] = y.detach()             # index_put_ of a tensor with a mask: 1
        z[mask] = 0.0                    # masked_fill: not counted
        x[torch.tensor([0, 2])].sum()    # integer indices: not counted
        y.sum().backward()               # the backward of x[mask] indexes with the mask again: 1
    assert collections_of(c.counts) == {"bool_mask_index": 3}
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_the_counter_finds_a_prod_in_the_graph_backward_runs_on_and_the_giou_loss_has_none():
    """prod's CUDA backward counts the zeros of its input on the host (7 syncs per DSET step on an H200 before
    ``side_product``); under a dispatch mode torch takes another path, so the counter reads the autograd graph."""
    from src.nn.box_ops import elementwise_giou_loss

    wh = torch.rand(5, 2, requires_grad=True)
    with sync_count.SyncCounter() as c:
        (wh.prod(-1).sum() + wh.prod()).backward()
    assert collections_of(c.counts) == {"prod_backward": 2}
    torch.testing.assert_close(wh.grad, wh.detach().flip(-1) + wh.detach().prod() / wh.detach())
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.4, 0.9]], requires_grad=True)
    with sync_count.SyncCounter() as c:
        elementwise_giou_loss(boxes, torch.tensor([[0.2, 0.1, 0.6, 0.5], [0.5, 0.5, 0.7, 0.7]])).sum().backward()
    assert c.counts == {} and torch.Tensor.backward.__name__ == "backward"  # none; restored


def collections_of(counts):
    out = {}
    for (kind, _), n in counts.items():
        out[kind] = out.get(kind, 0) + n
    return out


def test_a_dset_training_step_is_counted_per_step_with_its_sources(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, tmp_path / "out", dset=True, augment=False)
    assert sync_count.main(["-c", str(cfg), "--steps", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("host syncs per step: ") and float(out[-1].split(": ")[1]) > 0
    table = "\n".join(out)
    assert "src/zoo/rtdetr/matcher.py" in table and "src/zoo/rtdetr/moe.py" in table  # known sources (issue 18)


def test_with_the_cuda_dispatch_a_dset_step_reads_the_host_three_times_at_known_lines(tmp_path, capsys):
    """Issue 18's goal (at most 4 per step): the non-finite output flag, the step's flags and ONE transfer of
    every matching cost of the step; the MoE layers (dense dispatch, as on CUDA) and denoising read nothing."""
    data = make_tiny_dataset(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, tmp_path / "out", dset=True, augment=False)
    per_step = sync_count.count_steps(str(cfg), ["dset.moe_dispatch=dense"], 3, "cpu")
    for counts in per_step[1:]:  # the first step creates the optimizer's (host) step counts, read uncounted later
        assert sum(counts.values()) == 3, counts
        where = sorted(loc.split(":")[0] for (_, loc) in counts)
        assert where == ["src/solver/train_step.py", "src/solver/train_step.py", "src/zoo/rtdetr/matcher.py"], counts
