"""ONNX export (tools/export_onnx.py): the official RT-DETR deployment interface, DSET's pruner in the graph,
onnxruntime agrees with PyTorch; MoE dense dispatch equals the routed MoE."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers_tiny_run import tiny_config_dict

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from src.zoo.rtdetr.deformable_attention import MSDeformableAttention  # noqa: E402
from src.zoo.rtdetr.deploy import DeployModel, fuse_for_inference, load_detector, set_moe_dispatch  # noqa: E402
from src.zoo.rtdetr.moe import MoEFFN  # noqa: E402
from tools import export_onnx  # noqa: E402
from bench.latency_bench import tie_free_weights  # noqa: E402


def _tiny_config(tmp_path: Path, dset: bool) -> str:
    cfg = tiny_config_dict(tmp_path / "data", tmp_path / "out", dset=dset)
    path = tmp_path / ("dset.yaml" if dset else "plain.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _kept_sets(model, images):
    with torch.no_grad():
        model(images)
    return [info["kept_patch_idx"] for info in model.encoder.last_prune_info if info["pruned"]]


@pytest.mark.parametrize("dset, dispatch, fused", [(True, "sorted", False), (True, "dense", False),
                                                   (False, "dense", False), (True, "sorted", True)],
                         ids=["dset_pruning_moe_gather", "dset_pruning_moe_dense", "plain",
                              "dset_fused_as_the_tool_exports"])
def test_onnxruntime_matches_pytorch_with_the_deployment_interface(tmp_path, dset, dispatch, fused):
    torch.manual_seed(0)
    cfg, model, post = load_detector(_tiny_config(tmp_path, dset), random_weights=True)
    # noise on every weight: plain random init zeroes the box heads' last layer (boxes would not depend on the
    # decoder) and scores many queries alike (their order would be a tie-break); 0.02 keeps the pruners' scores
    # image-dependent enough that the test images keep different patches (checked below)
    model.load_state_dict(tie_free_weights(model, std=0.02))
    set_moe_dispatch(model, dispatch)  # sorted in PyTorch; the graph traces it as gather (computed slices)
    if fused:  # tools/export_onnx.py's default: RepVGG merged, conv + norm folded
        fuse_for_inference(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    deploy = DeployModel(model, post).eval()
    out = str(tmp_path / "model.onnx")
    hw = export_onnx.input_hw(cfg)
    export_onnx.export(deploy, out, hw)

    graph = onnx.load(out).graph
    ops = {n.op_type for n in graph.node}
    # one graph Conv per module conv (the fused model exports each merged RepVGG block as one Conv), plus the
    # decoder's value projections, traced as a 1x1 Conv per layer and level (MSDeformableAttention.value_levels)
    value_convs = sum(m.num_levels for m in model.modules() if isinstance(m, MSDeformableAttention))
    assert value_convs > 0
    assert sum(n.op_type == "Conv" for n in graph.node) == \
        sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) + value_convs
    if dset:  # the MoE layers' form in the graph
        moe_ops = {n.op_type for n in graph.node if "/moe/" in n.name}
        assert ("TopK" in moe_ops and "Slice" in moe_ops) == (dispatch == "sorted")  # router top-k + argsort
        assert ("Einsum" in moe_ops) == (dispatch == "dense") and "NonZero" not in moe_ops
    assert [i.name for i in graph.input] == ["images", "orig_target_sizes"]
    assert [o.name for o in graph.output] == ["labels", "boxes", "scores"]
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64

    # batch 3 (exported at batch 1: the batch axis is dynamic), images with different content
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, *hw, generator=g)
    images[1] = images[1].flip(-1)
    images[2] *= 0.3
    sizes = torch.tensor([[320, 192], [1000, 600], [160, 96]], dtype=torch.int64)
    if dset:
        kept = _kept_sets(model, images)
        assert len(kept) == 2, "both pruned levels must prune (keep_ratio 0.5, past warmup)"
        assert any(not torch.equal(k[0], k[1]) for k in kept), "test images should keep different patches"
    with torch.no_grad():
        ref_labels, ref_boxes, ref_scores = deploy(images, sizes)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    labels, boxes, scores = sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    assert scores.shape == (3, post.num_top_queries) and boxes.shape == (3, post.num_top_queries, 4)
    # tie-free weights: the same detections in the same order, to float rounding
    assert (labels == ref_labels.numpy()).all()
    assert abs(scores - ref_scores.numpy()).max() < 1e-4
    assert abs(boxes - ref_boxes.numpy()).max() < 1e-2  # pixels of images up to 1000 px wide
    assert ref_boxes[:, :, 2:].sub(ref_boxes[:, :, :2]).std() > 1.0  # boxes differ: they depend on the model
    # boxes follow orig_target_sizes (w, h) per image
    assert boxes[1, :, [0, 2]].max() <= 1000 + 1e-3 and boxes[2, :, [0, 2]].max() <= 160 + 1e-3


def test_dense_moe_dispatch_equals_routed_moe():
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, num_experts=4, top_k=2, noise_std=0.1).eval()
    x = torch.randn(2, 7, 16)
    routed = moe(x)
    moe.dispatch = "dense"
    dense = moe(x)
    # independent reference: per token, the two chosen experts' FFNs mixed by the softmax of their logits
    logits = moe.gate(x.reshape(-1, 16))
    top, idx = logits.topk(2, -1)
    w = top.softmax(-1)
    ref = torch.zeros(14, 16)
    for t in range(14):
        for j in range(2):
            e = idx[t, j]
            h = torch.relu(x.reshape(-1, 16)[t] @ moe.w1[e].T + moe.b1[e])
            ref[t] += w[t, j] * (h @ moe.w2[e].T + moe.b2[e])
    torch.testing.assert_close(dense.reshape(-1, 16), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, routed, atol=1e-5, rtol=1e-5)


def test_export_refuses_to_run_without_weights_or_random_weights_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_onnx.parse_args(["-c", "x.yaml", "--out", str(tmp_path / "m.onnx")])
    assert "--random-weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="random_weights"):
        load_detector(_tiny_config(tmp_path, False))


def test_the_moe_dispatch_bench_times_the_gather_and_dense_graphs_of_the_same_weights(capsys):
    from bench import onnx_moe_dispatch

    assert onnx_moe_dispatch.main(["--input", "160x192", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("dset_k0.3_moe 160x192") and lines[0].endswith("same top-k labels: True")
    nodes = {line.split()[0]: int(line.split(", ")[-1].split()[0]) for line in lines[1:]}
    assert set(nodes) == {"gather", "dense"} and nodes["gather"] > nodes["dense"]  # a slice per expert
