"""DSETCriterion owns every loss term of a DSET run (issue: one owner for the loss).

The reference values below were recorded with the code BEFORE the change that moved the DSET terms from the
training hook into the criterion (commit ef4525f: criterion terms + ``DSETHook.extra_losses``): the same
seed, model, batch and epoch must give the same loss dict, term by term.
"""
from __future__ import annotations

import pytest
import torch

from src.core import YAMLConfig
from src.core.hooks import TrainHook
from src.core.yaml_utils import ConfigError
from src.zoo.rtdetr import cass
from src.zoo.rtdetr import dset_losses as dl

REFERENCE = {
    "patch_warm": (["dset.cass_warmup_epochs=2"], 1, {
        'loss_bbox': 1.21875,
        'loss_bbox_aux_0': 1.5,
        'loss_bbox_aux_1': 1.3437498807907104,
        'loss_bbox_dn_0': 1.1320247650146484,
        'loss_bbox_dn_1': 1.1320247650146484,
        'loss_bbox_dn_2': 1.1320247650146484,
        'loss_bbox_enc_0': 1.5,
        'loss_cass': 0.00450360681861639,
        'loss_giou': 1.480254054069519,
        'loss_giou_aux_0': 1.4462956190109253,
        'loss_giou_aux_1': 1.622828722000122,
        'loss_giou_dn_0': 1.3930611610412598,
        'loss_giou_dn_1': 1.3930611610412598,
        'loss_giou_dn_2': 1.3930611610412598,
        'loss_giou_enc_0': 1.4462956190109253,
        'loss_moe_balance_decoder': 0.010122569277882576,
        'loss_moe_balance_encoder': 0.0010009286925196648,
        'loss_vfl': 0.6694287657737732,
        'loss_vfl_aux_0': 0.6045482158660889,
        'loss_vfl_aux_1': 0.5993704199790955,
        'loss_vfl_dn_0': 0.7625744938850403,
        'loss_vfl_dn_1': 0.8666841983795166,
        'loss_vfl_dn_2': 0.7419829368591309,
        'loss_vfl_enc_0': 0.5421868562698364,
    }),
    "perlevel": (["dset.cass_normalization=[object_balanced, area_patch]"], 3, {
        'loss_bbox': 1.21875,
        'loss_bbox_aux_0': 1.21875,
        'loss_bbox_aux_1': 1.312499761581421,
        'loss_bbox_dn_0': 1.147533655166626,
        'loss_bbox_dn_1': 1.147533655166626,
        'loss_bbox_dn_2': 1.147533655166626,
        'loss_bbox_enc_0': 1.3125,
        'loss_cass': 0.011604956351220608,
        'loss_giou': 1.480254054069519,
        'loss_giou_aux_0': 1.480254054069519,
        'loss_giou_aux_1': 1.5593568086624146,
        'loss_giou_dn_0': 1.361769676208496,
        'loss_giou_dn_1': 1.361769676208496,
        'loss_giou_dn_2': 1.361769676208496,
        'loss_giou_enc_0': 1.473983645439148,
        'loss_moe_balance_decoder': 0.010097729042172432,
        'loss_moe_balance_encoder': 0.0010049212723970413,
        'loss_vfl': 0.6818702816963196,
        'loss_vfl_aux_0': 0.7097684144973755,
        'loss_vfl_aux_1': 0.5834817886352539,
        'loss_vfl_dn_0': 0.8031936287879944,
        'loss_vfl_dn_1': 0.9009167551994324,
        'loss_vfl_dn_2': 0.8004270792007446,
        'loss_vfl_enc_0': 0.5576401948928833,
    }),
}


def _targets():
    return [{"labels": torch.tensor([0, 3, 1]),
             "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.8, 0.4, 0.3], [0.5, 0.4, 0.2, 0.3]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.7, 0.3, 0.2]])}]


def _step(overrides, epoch):
    """(cfg, criterion, outputs, losses) of one training forward of the DSET model at 128x128, seed 0."""
    torch.manual_seed(0)
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[128, 128]"] + overrides)
    model = cfg.model.train()
    for m in model.modules():
        if hasattr(m, "set_epoch"):
            m.set_epoch(epoch)
    criterion = cfg.criterion
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    targets = _targets()
    outputs = model(images, targets)
    return cfg, criterion, outputs, criterion(outputs, targets, epoch=epoch)


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_the_criterion_gives_the_loss_dict_recorded_before_it_owned_the_dset_terms(case):
    overrides, epoch, expected = REFERENCE[case]
    _, _, _, losses = _step(overrides, epoch)
    assert sorted(losses) == sorted(expected)
    for key, value in expected.items():
        # recorded on an Intel Xeon (AVX-512); an AMD EPYC (AVX2) gives the same code's losses within 7e-5 (the
        # MoE balance term, whose routing amplifies float rounding), the other terms within 4e-5
        assert float(losses[key].detach()) == pytest.approx(value, rel=2e-4, abs=1e-8), key


def test_dset_weights_live_in_the_criterions_weight_dict_and_scale_each_term():
    cfg, criterion, outputs, losses = _step(["dset.cass_warmup_epochs=2"], 1)
    w = criterion.weight_dict
    assert (w["loss_cass"], w["loss_moe_balance_encoder"], w["loss_moe_balance_decoder"]) == (0.05, 0.001, 0.01)
    assert w["loss_vfl"] == 1.0 and w["loss_bbox"] == 5.0 and w["loss_giou"] == 2.0
    # CASS: weight x warmup ramp (epoch 1 of 2: 0.5) x the mean over levels of the spec loss (independent path)
    gt = dl.targets_to_abs_xyxy(_targets(), (128, 128))
    per_level = [cass.cass_loss(i["patch_importance_scores"], gt, i["feat_shape"], (128, 128), 2,
                                cass.CASSConfig(normalization="patch")) for i in outputs["dset_prune_info"]]
    torch.testing.assert_close(losses["loss_cass"], 0.05 * 0.5 * torch.stack(per_level).mean())
    # MoE balance: weight x the mean of each layer's balance loss, read from the layers themselves
    model = cfg.model
    for part, weight, count in (("encoder", 0.001, 2), ("decoder", 0.01, 3)):
        layers = outputs[f"dset_moe_{part}"]
        assert len(layers) == count
        modules = [getattr(model, part).get_submodule(layer["name"]) for layer in layers]
        assert all(type(m).__name__ == "MoEFFN" for m in modules)
        expected = weight * torch.stack([m.last_aux["balance_loss"] for m in modules]).mean()
        torch.testing.assert_close(losses[f"loss_moe_balance_{part}"], expected)
    assert outputs["input_shape"] == (128, 128)


def test_cass_weight_zero_still_sends_a_zero_gradient_to_the_pruner():
    _, _, outputs, losses = _step(["dset.cass_loss_weight=0.0"], 0)
    assert float(losses["loss_cass"].detach()) == 0.0
    logits = outputs["dset_prune_info"][0]["patch_importance_scores"]
    (grad,) = torch.autograd.grad(losses["loss_cass"], [logits])
    assert torch.count_nonzero(grad) == 0


def test_dset_turned_off_leaves_only_the_detection_terms():
    _, criterion, outputs, losses = _step(["dset.enabled=false"], 0)
    assert not any(k.startswith(("loss_cass", "loss_moe")) for k in losses)
    assert outputs["dset_prune_info"] == [] and outputs["dset_moe_decoder"] == []
    assert set(criterion.weight_dict) == {"loss_vfl", "loss_bbox", "loss_giou"}


@pytest.mark.parametrize("key,value", [("criterion", "RTDETRCriterionv2"), ("model", "RTDETR")])
def test_a_dset_section_without_the_dset_model_or_criterion_is_refused(key, value):
    with pytest.raises(ConfigError) as err:
        YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=[f"{key}={value}"])
    msg = str(err.value)
    assert f"{key} is {value!r}" in msg and "include/dset.yaml" in msg and "dset.enabled: false" in msg


def test_a_per_level_mode_list_that_does_not_fit_the_pruned_levels_fails_at_build():
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml",
                     overrides=["input_size=[128, 128]", "dset.cass_normalization=[patch, object, patch]"])
    with pytest.raises(ConfigError, match="has 3 entries but the encoder prunes 2 level"):
        cfg.model


def test_hooks_have_no_loss_entry_point():
    assert not hasattr(TrainHook, "extra_losses")


def test_dset_modules_take_the_official_sections_and_refuse_a_section_of_their_own(tmp_path):
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[128, 128]",
                                                                      "HybridEncoder.nhead=4"])
    model = cfg.model
    assert type(model.encoder).__name__ == "DSETHybridEncoder" and model.encoder.encoder[0].layers[0].self_attn.num_heads == 4
    assert type(model.decoder).__name__ == "DSETTransformerv2" and model.decoder.num_classes == cfg["num_classes"]
    with pytest.raises(ConfigError, match=r"DSETHybridEncoder takes its settings from the HybridEncoder: section"):
        YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["DSETHybridEncoder.nhead=4"])


def test_a_plain_encoder_under_a_dset_section_is_refused_at_build():
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml",
                     overrides=["input_size=[128, 128]", "DSETRTDETR.encoder=HybridEncoder"])
    with pytest.raises(ConfigError, match="DSETRTDETR.encoder is HybridEncoder but the dset: section is on"):
        cfg.model


def test_with_dset_off_the_dset_modules_are_the_official_ones():
    torch.manual_seed(0)
    plain = YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml", overrides=["input_size=[128, 128]", "num_classes=5"]).model
    torch.manual_seed(0)
    off = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[128, 128]", "dset.enabled=false",
                                                                    "HybridEncoder.use_encoder_idx=[2]"]).model
    a, b = plain.state_dict(), off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pa, pb = plain.eval()(x), off.eval()(x)
    assert torch.equal(pa["pred_logits"], pb["pred_logits"]) and torch.equal(pa["pred_boxes"], pb["pred_boxes"])


def test_multiscale_batches_give_cass_in_each_batchs_own_pixel_frame():
    """Multi-scale training (collate_fn.scales): every batch has another padded size; the model reports it and
    CASS maps the boxes with it, as the spec loss on that batch's grid computes independently."""
    from src.data.collate import BatchImageCollateFunction

    torch.manual_seed(0)
    cfg = YAMLConfig("configs/dset4_r18_synth_cpu.yaml", overrides=["input_size=[128, 128]"])
    model, criterion = cfg.model.train(), cfg.criterion
    collate = BatchImageCollateFunction(scales=[[96, 160], [160, 96]])
    sample = (torch.rand(3, 120, 200), {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0], [150.0, 10.0, 190.0, 40.0]]),
                                        "labels": torch.tensor([1, 2]), "image_id": torch.tensor(1),
                                        "orig_size": torch.tensor([200, 120])})
    seen = set()
    for _ in range(6):
        images, targets = collate([sample, sample])
        outputs = model(images, targets)
        hw = tuple(images.shape[-2:])
        seen.add(hw)
        assert outputs["input_shape"] == hw
        gt = dl.targets_to_abs_xyxy(targets, hw)
        ref = torch.stack([cass.cass_loss(i["patch_importance_scores"], gt, i["feat_shape"], hw, 2,
                                          cass.CASSConfig(normalization="patch")) for i in outputs["dset_prune_info"]])
        assert [i["feat_shape"] for i in outputs["dset_prune_info"]] == [(hw[0] // 16, hw[1] // 16),
                                                                          (hw[0] // 32, hw[1] // 32)]
        torch.testing.assert_close(criterion(outputs, targets, epoch=5)["loss_cass"], 0.05 * ref.mean())
    assert seen == {(96, 160), (160, 96)}
