"""The pieces that keep a training step free of host syncs give what the code they replace gave: the MoE's
static (dense) dispatch, one matcher transfer for every matched layer, the denoising positives without
nonzero, host-built index tensors copied without blocking."""
from __future__ import annotations

import pytest
import torch

from src.misc.transfer import tensor_on, to_device
from src.zoo.rtdetr.denoising import positive_query_indices
from src.zoo.rtdetr.matcher import HungarianMatcher
from src.zoo.rtdetr.moe import MoEFFN
from src.zoo.rtdetr.rtdetrv2_criterion import match_from_indices, matches_from_indices


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_and_sorted_dispatch_give_the_same_training_outputs_balance_statistics_and_gradients(top_k):
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, num_experts=4, top_k=top_k, noise_std=0.5).train()
    x = torch.randn(3, 11, 16)
    results = {}
    for dispatch in ("sorted", "dense"):
        moe.dispatch = dispatch
        moe.zero_grad()
        torch.manual_seed(7)  # the same router noise for both
        y = moe(x)
        aux = moe.last_aux
        (y.square().sum() + aux["balance_loss"]).backward()
        results[dispatch] = (y.detach(), {k: v.detach() for k, v in aux.items()},
                             {n: p.grad.clone() for n, p in moe.named_parameters()})
    (y_s, aux_s, g_s), (y_d, aux_d, g_d) = results["sorted"], results["dense"]
    torch.testing.assert_close(y_d, y_s, atol=1e-5, rtol=1e-5)
    for k in aux_s:
        torch.testing.assert_close(aux_d[k], aux_s[k], atol=1e-6, rtol=1e-6)
    # counts of routed assignments: T * top_k in all, by brute force over the router's choice
    assert float(aux_d["expert_fraction"].sum()) == pytest.approx(1.0)
    for n in g_s:
        torch.testing.assert_close(g_d[n], g_s[n], atol=1e-4, rtol=1e-4)


def test_auto_dispatch_is_dense_on_cuda_and_sorted_elsewhere_and_a_bad_one_is_refused():
    moe = MoEFFN(8, 16)
    assert moe.dispatch == "auto"
    assert moe.resolved_dispatch(torch.device("cpu")) == "sorted"
    assert moe.resolved_dispatch(torch.device("cuda", 0)) == "dense"
    with pytest.raises(ValueError, match=r"dispatch='grouped' is not one of \['auto', 'sorted', 'dense'\]"):
        MoEFFN(8, 16, dispatch="grouped")


def test_moe_dispatch_key_is_validated_and_reaches_every_moe_layer():
    from src.core import YAMLConfig

    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["dset.moe_dispatch=dense"])
    layers = [m for m in cfg.model.modules() if isinstance(m, MoEFFN)]
    assert layers and {m.dispatch for m in layers} == {"dense"}
    with pytest.raises(Exception, match=r"moe_dispatch.*auto.*sorted.*dense"):
        YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["dset.moe_dispatch=fast"]).model


def _random_match_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    targets = [{"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2}
               for n in (3, 0, 5)]
    outputs = [{"pred_logits": torch.randn(3, 12, 5, generator=g), "pred_boxes": torch.rand(3, 12, 4, generator=g)}
               for _ in range(4)]
    return outputs, targets


def test_match_many_equals_one_forward_per_layer_with_one_host_transfer(monkeypatch):
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
    outputs, targets = _random_match_inputs(0)
    separate = [matcher(o, targets)["indices"] for o in outputs]
    transfers = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: transfers.append(t.shape) or real_cpu(t, *a, **k))
    together = [r["indices"] for r in matcher.match_many([(o, targets) for o in outputs])]
    assert len(transfers) == 1 and transfers[0] == (4 * 3 * 12 * 8,)  # 4 layers x B x Q x T costs
    for a, b in zip(separate, together):
        for (qa, ta), (qb, tb) in zip(a, b):
            assert torch.equal(qa, qb) and torch.equal(ta, tb)
    assert [len(q) for q, _ in together[0]] == [3, 0, 5]


def test_match_many_names_the_layer_whose_cost_is_not_finite():
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
    outputs, targets = _random_match_inputs(1)
    outputs[2]["pred_boxes"][1, 4, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\(outputs\['aux_outputs'\]\[1\]\)"):
        matcher.match_many([(o, targets) for o in outputs], names=["outputs", "outputs['aux_outputs'][0]",
                                                                   "outputs['aux_outputs'][1]", "x"])


def test_matches_from_indices_flattens_every_layer_like_a_per_image_loop():
    per_call = [[(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.int64),) * 2,
                 (torch.tensor([0, 7, 2]), torch.tensor([2, 0, 1]))],
                [(torch.tensor([3]), torch.tensor([0])), (torch.zeros(0, dtype=torch.int64),) * 2,
                 (torch.tensor([5]), torch.tensor([2]))]]
    num_targets = [2, 0, 3]
    matches = matches_from_indices(per_call, num_targets, "cpu")
    for indices, match in zip(per_call, matches):
        rows = [(b, int(q), int(t) + sum(num_targets[:b])) for b, (qs, ts) in enumerate(indices)
                for q, t in zip(qs, ts)]
        assert list(zip(match.batch_idx.tolist(), match.query_idx.tolist(), match.target_idx.tolist())) == rows
    single = match_from_indices(per_call[1], num_targets, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(single, matches[1]))


@pytest.mark.parametrize("counts", [[3, 0, 5], [1], [0, 2]])
def test_denoising_positives_are_the_nonzero_of_the_positive_mask(counts):
    num_group, max_count = 3, max(counts)
    group_size = 2 * max_count
    total = group_size * num_group
    valid = torch.arange(max_count)[None, :] < torch.tensor(counts)[:, None]
    is_negative = (torch.arange(total) % group_size) >= max_count
    positive = valid.repeat(1, 2 * num_group) & ~is_negative[None, :]
    reference = torch.split(torch.nonzero(positive)[:, 1], [n * num_group for n in counts])
    got = positive_query_indices(counts, num_group, group_size)
    assert [g.tolist() for g in got] == [r.tolist() for r in reference]


def test_host_built_tensors_stay_put_on_the_cpu_and_keep_their_values():
    host = torch.arange(5)
    assert to_device(host, "cpu") is host and to_device(host, None) is host
    t = tensor_on([[2, 3], [4, 5]], torch.device("cpu"), torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [[2.0, 3.0], [4.0, 5.0]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_built_tensors_reach_the_gpu_without_a_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = tensor_on([1, 2, 3], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert t.is_cuda and t.cpu().tolist() == [1, 2, 3]


def test_an_overflowing_expert_a_token_did_not_choose_reaches_neither_output_nor_gradients():
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, num_experts=4, top_k=1, noise_std=0.0).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every token chooses expert 0
        moe.b1[3].fill_(float("inf"))                          # expert 3 overflows on every token
    moe.dispatch = "dense"
    y = moe(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)
    reference = torch.relu(x @ moe.w1[0].T + moe.b1[0]) @ moe.w2[0].T + moe.b2[0]   # top-1 weight is 1
    torch.testing.assert_close(y.detach(), reference.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch, traced_as", [("auto", "gather"), ("sorted", "gather"), ("dense", "dense")])
def test_graph_export_traces_gather_or_an_explicit_dense_dispatch_and_generalises_to_other_token_counts(
        dispatch, traced_as):
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, dispatch=dispatch).eval()
    x = torch.randn(6, 8)
    traced = torch.jit.trace(moe, x, check_trace=False)
    graph = str(traced.graph)
    # gather: the assignments sorted by expert, each expert's slice bounds computed at run time; dense: einsum
    # over all experts; never the sorted form's split, whose group sizes the trace would freeze
    assert ("aten::argsort" in graph, "einsum" in graph, "split" in graph) == (traced_as == "gather",
                                                                          traced_as == "dense", False)
    for n in (6, 11, 1):  # token counts other than the traced one, routed differently
        y = torch.randn(n, 8)
        torch.testing.assert_close(traced(y), moe(y), atol=1e-5, rtol=1e-5)
