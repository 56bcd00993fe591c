"""DSET wired into the detector: pruning in the hybrid encoder, MoE FFNs, CASS/MoE losses in the loss dict."""
import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr.dset_config import validate_dset
from src.zoo.rtdetr.dset_losses import targets_to_abs_xyxy
from src.zoo.rtdetr.dset_encoder import DSETHybridEncoder
from src.zoo.rtdetr.hybrid_encoder import HybridEncoder
from src.zoo.rtdetr.moe import MoEFFN

ENC_KW = dict(in_channels=[32, 64, 128], feat_strides=[8, 16, 32], hidden_dim=64, nhead=4, dim_feedforward=128,
              use_encoder_idx=[1, 2], expansion=0.5)


def feats(batch=2, h=96, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h // s, w // s, generator=g) for c, s in zip([32, 64, 128], [8, 16, 32])]


def encoders(**dset_overrides):
    torch.manual_seed(0)
    plain = HybridEncoder(**ENC_KW).eval()
    dset = validate_dset({"patch_size": 2, "encoder_moe_num_experts": 0, **dset_overrides})
    torch.manual_seed(0)
    pruned = DSETHybridEncoder(**ENC_KW, dset=dset).eval()
    missing, unexpected = pruned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pruners.") for k in missing)
    return plain, pruned


def test_keep_ratio_one_gives_exactly_the_plain_encoder_output():
    plain, pruned = encoders(keep_ratio=1.0)
    x = feats()
    with torch.no_grad():
        for a, b in zip(plain(x), pruned(x)):
            assert torch.equal(a, b)
    assert [info["pruned"] for info in pruned.last_prune_info] == [False, False]


@pytest.mark.parametrize("h, w", [(96, 160), (128, 192)], ids=["partial_patches_masked", "whole_patches_unmasked"])
def test_pruned_cells_keep_their_projected_features_and_kept_cells_are_attended(h, w):
    # P5 is 3x5 (partial patches: key-padding mask, scratch row) or 4x6 (whole patches: neither)
    plain, pruned = encoders(keep_ratio=0.3)
    x = feats(h=h, w=w)
    with torch.no_grad():
        level = 2
        proj = pruned.input_proj[level](x[level])
        out = pruned.encode_level(1, proj)  # encoder index 1 = level 2 (P5)
        src = proj.flatten(2).transpose(1, 2)
        kept, kept_idx, info = pruned.pruners[1](src, proj.shape[-2:])
        flat_out = out.flatten(2).transpose(1, 2)
        kept_mask = torch.zeros(src.shape[:2], dtype=torch.bool)
        for b in range(src.shape[0]):
            kept_mask[b, kept_idx[b][info["kept_valid"][b]]] = True
        # reference: attention over the kept tokens only, computed independently of the scatter code
        pos = pruned.position_embedding(1, *proj.shape[-2:], src.device).expand(src.shape[0], -1, -1)
        for b in range(src.shape[0]):
            idx = kept_mask[b].nonzero().squeeze(1)
            ref = pruned.encoder[1](src[b:b + 1, idx], pos_embed=pos[b:b + 1, idx])[0]
            torch.testing.assert_close(flat_out[b, idx], ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(flat_out[b, ~kept_mask[b]], src[b, ~kept_mask[b]])
        assert int(kept_mask[0].sum()) == int(info["kept_valid"][0].sum())


def test_non_multiple_feature_maps_are_pruned_without_touching_padding():
    # 96x160 input -> P5 is 3x5, with patch 2 the last patch row/column are partial
    _, pruned = encoders(keep_ratio=0.5)
    with torch.no_grad():
        outs = pruned(feats(h=96, w=160))
    assert all(torch.isfinite(o).all() for o in outs)
    info = pruned.last_prune_info[1]
    assert info["patch_grid"] == (2, 3) and info["pruned"] and info["num_kept_patches"] == 3
    # brute force: the valid slots of every image are exactly the real cells of its kept patches, each once;
    # slots off the map (row 3, column 5) are invalid, so no padding cell is ever kept or scattered to
    h, w, k = 3, 5, 2
    proj = pruned.input_proj[2](feats(h=96, w=160)[2]).flatten(2).transpose(1, 2)
    with torch.no_grad():
        _, kept_idx, again = pruned.pruners[1](proj, (h, w))
    assert torch.equal(again["kept_patch_idx"], info["kept_patch_idx"])
    for b in range(kept_idx.shape[0]):
        expected = sorted(r * w + c for p in info["kept_patch_idx"][b].tolist()
                          for r in range((p // 3) * k, (p // 3) * k + k) for c in range((p % 3) * k, (p % 3) * k + k)
                          if r < h and c < w)
        valid = info["kept_valid"][b]
        assert sorted(kept_idx[b][valid].tolist()) == expected
        assert int((~valid).sum()) == 3 * k * k - len(expected) and bool((~valid).any())


def test_moe_replaces_ffns_in_encoder_and_decoder_when_configured():
    from src.core import YAMLConfig

    model = YAMLConfig("configs/dset4_r18_synth_cpu.yaml").model
    moe_names = [n for n, m in model.named_modules() if isinstance(m, MoEFFN)]
    assert moe_names == ["decoder.decoder.layers.0.moe", "decoder.decoder.layers.1.moe",
                         "decoder.decoder.layers.2.moe", "encoder.encoder.0.layers.0.moe",
                         "encoder.encoder.1.layers.0.moe"]
    sd = model.state_dict()
    assert "decoder.decoder.layers.0.linear1.weight" not in sd
    assert sd["encoder.encoder.0.layers.0.moe.w1"].shape == (4, 1024, 256)


def test_the_pruner_learns_from_cass_even_while_pruning_is_warming_up():
    from src.core import YAMLConfig

    torch.manual_seed(0)
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[128, 128]"])
    model = cfg.model.train()
    model.encoder.pruners[0].set_epoch(0)
    model.encoder.pruners[1].set_epoch(0)   # token_pruning_warmup_epochs 1: nothing pruned at epoch 0
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.8, 0.4, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    outputs = model(torch.rand(2, 3, 128, 128), targets)
    assert [info["pruned"] for info in outputs["dset_prune_info"]] == [False, False]
    losses = cfg.criterion(outputs, targets, epoch=0)
    grads = torch.autograd.grad(losses["loss_cass"], [p for n, p in model.named_parameters()
                                                     if "importance_predictor" in n])
    assert all(g.abs().sum() > 0 for g in grads)


def test_targets_convert_to_absolute_pixels_of_the_padded_input():
    t = [{"boxes": torch.tensor([[0.5, 0.25, 0.2, 0.1]])}]
    torch.testing.assert_close(targets_to_abs_xyxy(t, (200, 400))[0], torch.tensor([[160.0, 40.0, 240.0, 60.0]]))


@pytest.mark.parametrize("epoch,warm,expected", [(0, 0, 0.05), (0, 4, 0.0), (2, 4, 0.025), (9, 4, 0.05)])
def test_cass_weight_ramps_linearly_over_the_warmup_epochs(epoch, warm, expected):
    dset = validate_dset({"cass_loss_weight": 0.05, "cass_warmup_epochs": warm})
    assert dset.cass.weight_at(epoch) == pytest.approx(expected)
