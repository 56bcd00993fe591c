"""Deployment reparameterization (``fuse_for_inference``): folded conv-norm layers and merged RepVGG blocks give
the unfused model's outputs, checked against torch's own conv-BN fusion and the unfused modules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bench.latency_bench import tie_free_weights
from src.nn.backbone.common import ConvNormLayer, FrozenBatchNorm2d, fold_norm
from src.zoo.rtdetr.deploy import DeployModel, fuse_for_inference, load_detector
from src.zoo.rtdetr.hybrid_encoder import RepVggBlock
from tests.helpers_tiny_run import assert_same_queries


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm / FrozenBatchNorm non-trivial statistics and affine terms (a fresh model has mean 0,
    var 1, weight 1, bias 0, which a wrong fold would get right by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


@pytest.mark.parametrize("norm_cls", [nn.BatchNorm2d, FrozenBatchNorm2d])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_norm_equals_torchs_conv_bn_fusion(norm_cls, conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, 2, padding=1, bias=conv_bias).eval()
    norm = randomize_norms(norm_cls(8)).eval()
    weight, bias = fold_norm(conv.weight, conv.bias, norm)
    bn = nn.BatchNorm2d(8).eval()  # torch's fusion reads a BatchNorm2d: copy the same statistics into one
    bn.load_state_dict(norm.state_dict())
    ref = fuse_conv_bn_eval(copy.deepcopy(conv), bn)
    torch.testing.assert_close(weight, ref.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, ref.bias, rtol=1e-6, atol=1e-7)


def test_a_folded_conv_norm_layer_gives_the_same_outputs_and_has_no_norm_left():
    torch.manual_seed(0)
    layer = randomize_norms(ConvNormLayer(6, 8, 3, 1, act="silu")).eval()
    x = torch.randn(2, 6, 11, 13)
    ref = layer(x)
    layer.fold_norm()
    assert isinstance(layer.norm, nn.Identity) and layer.conv.bias is not None
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.fold_norm()  # a second call changes nothing
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_a_reparameterized_repvgg_block_is_one_3x3_conv_with_the_same_outputs():
    torch.manual_seed(0)
    block = randomize_norms(RepVggBlock(8, 8, act="silu")).eval()
    x = torch.randn(2, 8, 9, 12)
    ref = block(x)
    block.reparameterize()
    assert block.conv2 is None and block.conv1.conv.kernel_size == (3, 3)
    assert [type(m).__name__ for m in block.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))] == ["Conv2d"]
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_folding_refuses_a_model_in_training_mode():
    layer = ConvNormLayer(3, 4, 3, 1)
    with pytest.raises(RuntimeError, match=r"ConvNormLayer is in training mode; call .eval"):
        layer.fold_norm()
    with pytest.raises(RuntimeError, match=r"ConvNormLayer is in training mode; call .eval"):
        fuse_for_inference(nn.Sequential(layer))
    block = RepVggBlock(4, 4)
    with pytest.raises(RuntimeError, match=r"RepVggBlock.reparameterize: the block is in training mode"):
        block.reparameterize()


def test_a_folded_layer_refuses_to_train_instead_of_training_without_its_norm():
    layer = ConvNormLayer(3, 4, 3, 1).eval()
    layer.fold_norm()
    layer.train()
    with pytest.raises(RuntimeError, match=r"folded for deployment \(fuse_for_inference\): it cannot train"):
        layer(torch.rand(1, 3, 8, 8))


def test_a_repvgg_block_whose_norm_cannot_fold_is_left_unchanged():
    block = RepVggBlock(4, 4).eval()
    block.conv2.norm = nn.BatchNorm2d(4, track_running_stats=False).eval()  # batch statistics: nothing to fold
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(ValueError, match=r"no running statistics to fold; the block is left unchanged"):
        block.reparameterize()
    after = block.state_dict()
    assert block.conv2 is not None and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sync_batch_norm_folds_like_batch_norm():
    torch.manual_seed(0)
    layer = randomize_norms(ConvNormLayer(6, 8, 3, 1, act="relu"))
    sync = copy.deepcopy(layer)
    sync.norm = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(sync.norm))[0]
    layer.eval(), sync.eval()
    x = torch.randn(2, 6, 9, 9)
    ref = layer(x)
    assert sync.fold_norm() and isinstance(sync.norm, nn.Identity)
    torch.testing.assert_close(sync(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, convs", [
    # plain RT-DETRv2-R18: 69 convolutions (12 RepVGG blocks x 2 branches) become the official deploy model's 57
    (["dset.enabled=false", "HybridEncoder.use_encoder_idx=[2]"], 57),
    (["dset.keep_ratio=0.3", "dset.min_patches=1"], 57),  # DSET: the same conv stack, pruner untouched
])
def test_the_fused_detector_gives_the_unfused_detections(overrides, convs):
    torch.manual_seed(0)
    _, model, post = load_detector("configs/dset4_r18_ratio0.3.yaml", ["input_size=[128, 160]"] + overrides,
                                   random_weights=True)
    model.load_state_dict(tie_free_weights(model))  # random init scores many queries alike (bench/latency_bench.py)
    randomize_norms(model)
    images = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[160, 128], [320, 256]])
    with torch.no_grad():
        ref_out = model(images)
        ref = DeployModel(model, post)(images, sizes)
        fused_model = fuse_for_inference(copy.deepcopy(model))
        out = fused_model(images)
        got = DeployModel(fused_model, post)(images, sizes)
    assert sum(isinstance(m, nn.Conv2d) for m in fused_model.modules()) == convs
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fused_model.modules())
    # folding rounds differently: near-tied queries may swap (assert_same_queries)
    assert_same_queries(out, ref_out, tol=2e-3)
    # the deployed top-K scores, sorted: the same values (the order of near-ties aside)
    torch.testing.assert_close(got[2].sort(-1).values, ref[2].sort(-1).values, rtol=1e-3, atol=1e-4)


def test_the_deployed_model_skips_moe_routing_statistics_without_changing_outputs():
    """Routing statistics (``last_aux``: balance loss, expert fractions) feed the training loss and TensorBoard
    only; DeployModel turns them off (fewer operators per forward), the detections stay bit-identical."""
    from src.zoo.rtdetr.moe import MoEFFN

    torch.manual_seed(0)
    _, model, post = load_detector("configs/dset4_r18_ratio0.3.yaml", ["input_size=[128, 160]", "dset.min_patches=1"],
                                   random_weights=True)
    images, sizes = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(1)), torch.tensor([[160, 128]])
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == 5
    with torch.no_grad():
        ref = post.forward_batched(model(images), sizes)
        assert all(m.last_aux is not None for m in moes)
        deploy = DeployModel(model, post)
        got = deploy(images, sizes)
    assert all(not m.record_statistics and m.last_aux is None for m in moes)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    model.train()(images)  # training always records: its balance loss needs the statistics
    assert all(m.last_aux is not None for m in moes)


def test_a_channels_last_deployment_gives_the_contiguous_detections_and_exports_the_same_graph(tmp_path):
    """On a CPU the tools deploy in channels_last (``inference_memory_format``): the conv weights change layout,
    the images are converted in ``forward``, the detections equal the contiguous model's within float rounding,
    and the exported ONNX graph is the same graph (no layout in a traced graph)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from src.zoo.rtdetr.deploy import export, inference_memory_format

    assert inference_memory_format("cpu") == torch.channels_last
    assert inference_memory_format("cuda:1") == torch.contiguous_format
    torch.manual_seed(0)
    _, model, post = load_detector("configs/dset4_r18_ratio0.3.yaml", ["input_size=[128, 160]", "dset.min_patches=1"],
                                   random_weights=True)
    model.load_state_dict(tie_free_weights(model))
    randomize_norms(model)
    fused = fuse_for_inference(model.eval())
    images = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))  # contiguous, as a user gives
    sizes = torch.tensor([[160, 128], [320, 256]])
    with torch.no_grad():
        ref = DeployModel(copy.deepcopy(fused), post).eval()
        cl = DeployModel(copy.deepcopy(fused), post, torch.channels_last).eval()
        layouts = []  # what each detector is given: channels_last converted in forward, else as passed
        for deploy in (ref, cl):
            deploy.model.register_forward_pre_hook(lambda m, args: layouts.append(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
        want, got = ref(images, sizes), cl(images, sizes)
        assert layouts == [False, True]
        want_raw, got_raw = ref.model(images), cl.model(images.contiguous(memory_format=torch.channels_last))
    convs = [m.weight for m in cl.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) > len(convs) // 2  # (a 1x1 kernel is both layouts)
    # another summation order: near-tied queries may swap places (assert_same_queries), nothing else changes
    assert_same_queries(got_raw, want_raw, tol=1e-4, max_moved=0.03)
    torch.testing.assert_close(got[2].sort(-1).values, want[2].sort(-1).values, rtol=0, atol=1e-5)  # scores
    assert (got[0] == want[0]).float().mean() > 0.9                                 # labels, in score order
    export(ref, str(tmp_path / "a.onnx"), (128, 160))
    export(cl, str(tmp_path / "b.onnx"), (128, 160))
    a, b = onnx.load(str(tmp_path / "a.onnx")).graph, onnx.load(str(tmp_path / "b.onnx")).graph
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    inits = {i.name: numpy_helper.to_array(i) for i in b.initializer}
    assert len(inits) == len(a.initializer)
    assert all((numpy_helper.to_array(i) == inits[i.name]).all() for i in a.initializer)
