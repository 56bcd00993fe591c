"""`dset.cass_normalization` as one mode per pruned level, the per-level target diagnostics and the CASS
gradient strength, against the loop oracle and hand-computed values."""
import math

import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.cass import CASSConfig
from src.zoo.rtdetr.dset_config import level_normalizations, validate_dset
from src.zoo.rtdetr.hybrid_encoder import HybridEncoder
from tests import cass_oracle as oracle
from tests.test_cass import IMG, random_boxes
from tests.test_dset_integration import ENC_KW, feats

SHAPES = [(12, 20), (6, 10)]        # P3-like and P4-like levels of the 96 x 160 input


@pytest.mark.parametrize('modes', [('object_balanced', 'area_patch'), ('patch', 'object'),
                                   ('object_area', 'object_balanced')])
def test_per_level_modes_equal_each_level_alone_against_the_oracle(modes):
    gen = torch.Generator().manual_seed(11)
    gt = [random_boxes(gen, 5), random_boxes(gen, 0), random_boxes(gen, 3)]
    logits = [torch.randn(3, h * w, generator=gen, dtype=torch.float64) for h, w in SHAPES]
    cfgs = [CASSConfig(normalization=m) for m in modes]
    alone = [oracle.oracle_cass_loss(z, gt, s, IMG, 1, c) for z, s, c in zip(logits, SHAPES, cfgs)]
    value = cass.cass_loss_levels(logits, gt, SHAPES, IMG, 1, cfgs)
    assert value.item() == pytest.approx((alone[0] + alone[1]).item() / 2, abs=1e-12)


def test_per_level_list_goes_through_the_dset_settings_to_the_loss():
    gen = torch.Generator().manual_seed(12)
    gt = [random_boxes(gen, 4), random_boxes(gen, 2)]
    logits = [torch.randn(2, h * w, generator=gen, dtype=torch.float64) for h, w in SHAPES]
    infos = [{'patch_importance_scores': z, 'feat_shape': s} for z, s in zip(logits, SHAPES)]
    dset = validate_dset({'patch_size': 1, 'cass_normalization': ['object_balanced', 'area_patch']})
    got = dl.compute_cass(infos, gt, IMG, dset)
    want = [oracle.oracle_cass_loss(z, gt, s, IMG, 1, CASSConfig(normalization=m))
            for z, s, m in zip(logits, SHAPES, ('object_balanced', 'area_patch'))]
    assert got.item() == pytest.approx((want[0] + want[1]).item() / 2, abs=1e-12)


def test_cass_normalization_list_is_validated_with_the_key_named():
    assert validate_dset({'cass_normalization': ['patch', 'object']})['cass_normalization'] == ['patch', 'object']
    for bad in (['patch', 'objects'], [], [1, 2], 'objects'):
        with pytest.raises(ValueError) as e:
            validate_dset({'cass_normalization': bad}, where='cfg.yaml: dset')
        assert 'cfg.yaml: dset.cass_normalization' in str(e.value) and 'one per pruned level' in str(e.value)
    assert level_normalizations('object', 2) == ['object', 'object']
    with pytest.raises(ValueError, match=r"has 3 entries but the encoder prunes 2 level\(s\)"):
        level_normalizations(['patch', 'object', 'patch'], 2)


def test_encoder_gives_each_pruner_its_level_mode_and_refuses_a_wrong_length():
    dset = validate_dset({'patch_size': 2, 'cass_normalization': ['object_balanced', 'area_patch']})
    enc = HybridEncoder(**ENC_KW, dset=dset)
    assert [p.cass_config.normalization for p in enc.pruners] == ['object_balanced', 'area_patch']
    enc.eval()(feats())
    assert len(enc.last_prune_info) == 2
    with pytest.raises(ValueError, match='use_encoder_idx'):
        HybridEncoder(**ENC_KW, dset=validate_dset({'cass_normalization': ['patch']}))


def test_cass_gradient_norm_equals_the_hand_computed_mse_gradient():
    """mse, 'patch': L = mean_(b,p) (q - y)^2 with z = 0, q = 1/2: dL/dz = 2 (q - y) q (1 - q) / (B P)."""
    cfg = CASSConfig(normalization='patch', loss_type='mse')
    gt = [torch.tensor([[10.0, 20.0, 70.0, 80.0]], dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    feat = (6, 10)
    y = cass.generate_soft_target_mask(gt, feat, IMG, 1, cfg)              # [2, 60]
    grad = 2 * (0.5 - y) * 0.25 / y.numel()
    expected = math.sqrt(float((grad ** 2).sum()))
    z = torch.zeros(2, 60, dtype=torch.float64)
    assert cass.cass_score_gradient_norm([z], gt, [feat], IMG, 1, cfg).item() == pytest.approx(expected, rel=1e-10)
    # two levels: the mean over levels halves each level's gradient
    both = cass.cass_score_gradient_norm([z, z.clone()], gt, [feat, feat], IMG, 1, cfg).item()
    assert both == pytest.approx(math.sqrt(2) * expected / 2, rel=1e-10)


def test_bottom_keep_ratio_and_target_shares_equal_hand_computed_values():
    """A 4 x 4 grid (one patch per cell) on a 64 x 64 input, one box covering the bottom-left 2 x 2 cells,
    r 0: the target sits in the bottom half; keep 4 of 16 patches, 2 of them in the bottom half."""
    img, feat = (64, 64), (4, 4)
    cfg = CASSConfig(expansion_ratio=0.0, min_size=0.0)
    gt = [torch.tensor([[0.0, 32.0, 32.0, 64.0]], dtype=torch.float64)]
    z = torch.full((4, 4), -5.0, dtype=torch.float64)
    z[0, 0:2] = 5.0      # two kept patches in the top half
    z[2, 0:2] = 5.0      # two kept in the bottom half
    y = cass.generate_soft_target_mask(gt, feat, img, 1, cfg)[0].reshape(4, 4)
    out = cass.finalize_keep_bias(cass.keep_bias_stats(z.reshape(1, -1), gt, feat, img, 1, 0.25, cfg))
    assert float(y[:2].sum()) == 0.0 and out['target_bottom_share'] == pytest.approx(1.0)
    assert out['kept_bottom_share'] == pytest.approx(0.5) and out['bottom_keep_ratio'] == pytest.approx(0.5)
    assert out['keep_fraction'] == pytest.approx(0.25)
    assert out['target_positive_share'] == pytest.approx(float((y > 0).sum()) / 16)
