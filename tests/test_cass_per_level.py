"""`dset.cass_normalization` as one mode per pruned level, the per-level target diagnostics and the CASS
gradient strength, against the loop oracle and hand-computed values."""
import math

import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.cass import CASSConfig
from src.zoo.rtdetr.dset_config import level_normalizations, validate_dset
from src.zoo.rtdetr.dset_decoder import DSETTransformerv2
from src.zoo.rtdetr.dset_encoder import DSETHybridEncoder
from src.zoo.rtdetr import cass_oracle as oracle
from tests.test_cass import IMG, random_boxes
from tests.test_dset_integration import ENC_KW, feats

DEC_KW = dict(num_classes=3, hidden_dim=64, num_queries=10, feat_channels=[64, 64, 64], num_layers=1, nhead=4,
              dim_feedforward=64, num_denoising=0)

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
    got = dl.compute_cass(infos, gt, IMG, dset.pruner.patch_size, dset.cass.level_configs(len(infos)))
    want = [oracle.oracle_cass_loss(z, gt, s, IMG, 1, CASSConfig(normalization=m))
            for z, s, m in zip(logits, SHAPES, ('object_balanced', 'area_patch'))]
    assert got.item() == pytest.approx((want[0] + want[1]).item() / 2, abs=1e-12)


def test_cass_normalization_list_is_validated_with_the_key_named():
    assert validate_dset({'cass_normalization': ['patch', 'object']}).cass.normalization == ('patch', 'object')
    for bad in (['patch', 'objects'], [], [1, 2], 'objects'):
        with pytest.raises(ValueError) as e:
            validate_dset({'cass_normalization': bad}, where='cfg.yaml: dset')
        assert 'cfg.yaml: dset.cass_normalization' in str(e.value) and 'one per pruned level' in str(e.value)
    assert level_normalizations('object', 2) == ['object', 'object']
    with pytest.raises(ValueError, match=r"has 3 entries but the encoder prunes 2 level\(s\)"):
        level_normalizations(['patch', 'object', 'patch'], 2)


def test_each_pruned_level_gets_its_mode_and_a_wrong_length_is_refused_at_build():
    dset = validate_dset({'patch_size': 2, 'cass_normalization': ['object_balanced', 'area_patch']})
    assert [c.normalization for c in dset.cass.level_configs(2)] == ['object_balanced', 'area_patch']
    enc = DSETHybridEncoder(**ENC_KW, dset=dset)
    enc.eval()(feats())
    assert len(enc.last_prune_info) == 2
    from src.zoo.rtdetr.dset_model import DSETRTDETR
    with pytest.raises(ValueError, match='use_encoder_idx'):
        one = validate_dset({'cass_normalization': ['patch']})
        DSETRTDETR(torch.nn.Identity(), DSETHybridEncoder(**ENC_KW, dset=one), DSETTransformerv2(**DEC_KW, dset=one),
                   dset=one)
