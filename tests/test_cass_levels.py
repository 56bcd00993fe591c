"""Per-level keep-recall (P4 / P5 next to the pooled figures) against a hand-computed case."""
import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr.cass import CASSConfig

IMG = (256, 256)
P4, P5 = (16, 16), (8, 8)          # strides 16 and 32
CFG = CASSConfig(min_size=0.0)      # no widening: the core patches below are exact
KEEP = 0.25                         # K = 64 of 256 patches on P4, 16 of 64 on P5
# one image, two boxes: S small and far (top-left, 16 x 16 px), L large and near (bottom-right, 128 x 128 px)
GT = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [128.0, 128.0, 256.0, 256.0]], dtype=torch.float64)]


def _p4_logits():
    """S's one core patch (0, 0) kept; L's core (rows 8-15, cols 8-15) kept in its top 4 rows (32 of 64);
    31 background patches fill the rest of K = 64."""
    z = torch.full((16, 16), -5.0, dtype=torch.float64)
    z[0, 0] = 10.0
    z[8:12, 8:16] = 10.0
    z[0:2, 4:16] = 5.0          # 24 background patches
    z[2, 4:11] = 5.0            # 7 more: 1 + 32 + 31 = 64 = K
    return z.reshape(1, -1)


def _p5_logits():
    """S's core patch (0, 0) dropped; L's core (rows 4-7, cols 4-7, 16 patches) kept in row 4 only (4 of
    16); 12 background patches fill K = 16."""
    z = torch.full((8, 8), -5.0, dtype=torch.float64)
    z[4, 4:8] = 10.0
    z[0:2, 2:8] = 5.0
    return z.reshape(1, -1)


def _finalized(with_levels=True):
    sums = {}
    for logits, feat in ((_p4_logits(), P4), (_p5_logits(), P5)):
        level = cass.level_name(feat, IMG) if with_levels else None
        for key, value in cass.keep_bias_stats(logits, GT, feat, IMG, 1, KEEP, CFG, level=level).items():
            sums[key] = sums.get(key, 0) + value
    return cass.finalize_keep_bias(sums)


def test_level_names_follow_the_stride():
    assert cass.level_name(P4, IMG) == 'P4' and cass.level_name(P5, IMG) == 'P5'
    assert cass.level_name((18, 32), (288, 512)) == 'P4' and cass.level_name((23, 40), (736, 1280)) == 'P5'


def test_per_level_keep_recall_equals_hand_computed_values():
    result = _finalized()
    expected = {
        # P4: S 1/1 kept, L 32/64 kept; P5: S 0/1, L 4/16
        'keep_recall_small_P4': 1.0, 'keep_recall_far_P4': 1.0,
        'keep_recall_large_P4': 0.5, 'keep_recall_near_P4': 0.5,
        'keep_recall_small_P5': 0.0, 'keep_recall_far_P5': 0.0,
        'keep_recall_large_P5': 0.25, 'keep_recall_near_P5': 0.25,
        'keep_recall_medium_P4': 0.0, 'num_boxes_medium_P4': 0.0,     # empty bucket: 0 with count 0
        'num_boxes_small_P4': 1.0, 'num_boxes_large_P5': 1.0,
        # pooled: each box counted once per level
        'keep_recall_small': 0.5, 'keep_recall_far': 0.5,
        'keep_recall_large': 0.375, 'keep_recall_near': 0.375,
        'num_boxes_small': 2.0, 'num_boxes_large': 2.0,
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_level_copies_do_not_change_the_pooled_figures():
    with_levels, pooled = _finalized(True), _finalized(False)
    assert {k: v for k, v in with_levels.items() if k in pooled} == pooled
    assert set(with_levels) - set(pooled) == {f'{k}_{lv}' for k in pooled for lv in ('P4', 'P5')}


def test_tensorboard_tags_put_levels_in_their_own_group():
    assert cass.bias_tag('keep_recall_near_P5') == 'P5/keep_recall_near'
    assert cass.bias_tag('centroid_dy_P4') == 'P4/centroid_dy'
    assert cass.bias_tag('keep_recall_near') == 'keep_recall_near'
    assert cass.bias_tag('num_boxes_without_core') == 'num_boxes_without_core'
