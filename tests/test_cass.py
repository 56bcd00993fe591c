"""CASS maths (src/zoo/rtdetr/cass.py) against the per-box loop oracle (src/zoo/rtdetr/cass_oracle.py) and hand values."""
import itertools
import math

import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr.cass import NORMALIZATIONS, CASSConfig
from src.zoo.rtdetr import cass_oracle as oracle

IMG = (96, 160)          # H, W of the padded input
FEAT = (6, 10)           # h, w: stride 16
LOSS_TYPES = ('mse', 'focal', 'vfl')


def random_boxes(gen, n, img_shape=IMG, max_size=70.0):
    """n boxes with centres anywhere in the image (some cross its border) and sides 0.5..max_size px."""
    H, W = img_shape
    centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * max_size + 0.5
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def edge_case_boxes(img_shape, feat_shape, patch_size):
    """Tiny, degenerate, edge-touching, partly outside, overlapping and patch-centre-aligned boxes (pixels)."""
    H, W = img_shape
    sy, sx = H / feat_shape[0], W / feat_shape[1]
    k = patch_size
    return torch.tensor([
        [10.0, 12.0, 10.4, 12.3],                        # tiny: widened to min_size
        [30.0, 20.0, 30.0, 50.0],                        # zero width
        [0.0, 0.0, W, 0.5 * H],                          # touches three image edges
        [-25.0, H - 20.0, 15.0, H + 30.0],               # partly outside (bottom-left)
        [W - 12.0, -8.0, W + 40.0, 30.0],                # partly outside (top-right)
        [40.0, 30.0, 90.0, 70.0],                        # overlaps the next one
        [60.0, 40.0, 110.0, 80.0],
        [0.5 * k * sx, 0.5 * k * sy, 1.5 * k * sx, 2.5 * k * sy],   # edges exactly on patch centres
        [-80.0, -80.0, -40.0, -40.0],                    # entirely outside
    ], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize('decay, subpixel, patch_size, feat',
                         list(itertools.product(('gaussian', 'linear'), (True, False), (1, 4),
                                                ((6, 10), (7, 9), (5, 13)))))
def test_soft_mask_equals_per_patch_loop_oracle(decay, subpixel, patch_size, feat):
    gen = torch.Generator().manual_seed(1)
    cfg = CASSConfig(decay_type=decay, use_subpixel_offset=subpixel, expansion_ratio=0.8, min_size=2.0)
    boxes = torch.cat([random_boxes(gen, 12), edge_case_boxes(IMG, feat, patch_size)])
    batch_idx = torch.zeros(len(boxes), dtype=torch.long)
    masks = cass.soft_target_masks(boxes, batch_idx, feat, IMG, patch_size, cfg)
    expected = torch.tensor([oracle.box_mask_scalar(b, feat, IMG, patch_size, cfg) for b in boxes],
                            dtype=torch.float64)
    torch.testing.assert_close(masks, expected, atol=1e-12, rtol=1e-9)
    per_box = torch.stack([oracle.box_mask(b, feat, IMG, patch_size, cfg) for b in boxes])
    torch.testing.assert_close(per_box, expected, atol=1e-12, rtol=1e-9)
    assert (expected > 0).any() and (expected == 1).any() and ((expected > 0) & (expected < 1)).any()


def test_partial_last_patch_keeps_centre_at_j_plus_half_k():
    """h = w = 5 cells, k = 4: the last patch covers cell 4 only but its centre stays at 1.5 k = 6 cells."""
    feat, img, k = (5, 5), (80, 80), 4                       # stride 16
    cy, cx = cass.patch_centres(feat, k)
    assert cx.tolist() == [2.0, 6.0] and cy.tolist() == [2.0, 6.0]
    assert cass.patch_grid(feat, k) == (2, 2)
    cfg = CASSConfig(min_size=0.0, expansion_ratio=0.0)
    beyond = torch.tensor([[5.5 * 16, 0.0, 6.5 * 16, 7 * 16.0]])   # spans the centres x = 6 (outside the map)
    at_clipped_centre = torch.tensor([[4.1 * 16, 0.0, 4.9 * 16, 7 * 16.0]])  # spans x = 4.5, the clipped centre
    m_beyond = cass.soft_target_masks(beyond, torch.zeros(1, dtype=torch.long), feat, img, k, cfg)
    m_clipped = cass.soft_target_masks(at_clipped_centre, torch.zeros(1, dtype=torch.long), feat, img, k, cfg)
    assert m_beyond.reshape(2, 2).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert m_clipped.sum() == 0


@pytest.mark.parametrize('subpixel', [True, False])
def test_core_is_closed_and_band_decay_matches_hand_values(subpixel):
    """Stride 16, k = 4: centres at x = 2, 6, 10 and y = 2, 6 cells. Box [2, 2, 6, 6] cells has the four
    centres (2|6, 2|6) exactly on its edges: all core (1). With r = 1 the band reaches x = 10, and patch
    (0, 2) is at distance 4 from the box, normalised by sqrt(4^2 + 4^2): d = 1/sqrt(2), so
    gaussian exp(-d^2 / 0.5) = exp(-1) and linear 1 - 1/sqrt(2); with r = 0.5 it is outside the band."""
    box = torch.tensor([[32.0, 32.0, 96.0, 96.0]], dtype=torch.float64)
    idx = torch.zeros(1, dtype=torch.long)

    def grid(**kw):
        cfg = CASSConfig(min_size=0.0, use_subpixel_offset=subpixel, **kw)
        return cass.soft_target_masks(box, idx, FEAT, IMG, 4, cfg).reshape(2, 3)

    assert grid(expansion_ratio=0.5).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    gauss = grid(expansion_ratio=1.0, decay_type='gaussian')
    linear = grid(expansion_ratio=1.0, decay_type='linear')
    assert gauss[:, 2].tolist() == pytest.approx([math.exp(-1.0)] * 2, abs=1e-12)
    assert linear[:, 2].tolist() == pytest.approx([1 - 1 / math.sqrt(2)] * 2, abs=1e-12)
    assert cass.core_masks(box, FEAT, IMG, 4, CASSConfig(min_size=0.0)).reshape(2, 3).tolist() == \
        [[True, True, False], [True, True, False]]


def test_merged_target_is_max_over_boxes_and_zero_for_image_without_boxes():
    gen = torch.Generator().manual_seed(2)
    cfg = CASSConfig()
    gt = [random_boxes(gen, 4), random_boxes(gen, 0), random_boxes(gen, 3)]
    target = cass.generate_soft_target_mask(gt, FEAT, IMG, 1, cfg)
    expected = torch.stack([oracle.image_target(b, FEAT, IMG, 1, cfg) for b in gt])
    torch.testing.assert_close(target, expected, atol=1e-12, rtol=1e-9)
    assert target[1].abs().sum() == 0


def test_patch_area_weight_is_area_of_largest_covering_box():
    cfg = CASSConfig(expansion_ratio=0.5)
    small = torch.tensor([[20.0, 20.0, 40.0, 40.0]], dtype=torch.float64)
    large = torch.tensor([[10.0, 10.0, 90.0, 60.0]], dtype=torch.float64)
    gt = [torch.cat([small, large]), small]
    a = cass.patch_area_weight(gt, FEAT, IMG, 1, cfg)
    m_small = oracle.box_mask(small[0], FEAT, IMG, 1, cfg)
    m_large = oracle.box_mask(large[0], FEAT, IMG, 1, cfg)
    area_small, area_large = 400 / (96 * 160), 80 * 50 / (96 * 160)
    expected0 = torch.where(m_large > 0, area_large, torch.where(m_small > 0, area_small, 0.0))
    torch.testing.assert_close(a[0], expected0.to(a.dtype))
    torch.testing.assert_close(a[1], torch.where(m_small > 0, area_small, 0.0).to(a.dtype))


# ------------------------------------------------------------------------------------------ per-patch loss
LN2 = math.log(2.0)


@pytest.mark.parametrize('loss_type, z, y, expected', [
    # z = 0: q = 1 - q = 0.5, log q = log(1 - q) = -ln 2
    ('focal', 0.0, 0.3, 0.3 * 0.5 ** 2 * LN2 + 0.7 * 0.5 ** 4 * LN2),   # 0.11875 ln 2 = 0.0823112
    ('focal', 0.0, 0.0, 0.0433216988),                                 # 0.5^4 ln 2
    ('mse', 0.0, 0.3, 0.04),                                           # (0.5 - 0.3)^2
    ('vfl', 0.0, 0.3, 0.2079441542),                                   # -0.3 (0.3 + 0.7)(-ln 2) = 0.3 ln 2
    ('vfl', 0.0, 0.0, 0.0866433976),                                   # 2 * 0.5^4 * ln 2
    # z = ln 3: q = 0.75
    ('focal', math.log(3.0), 1.0, 0.0179801295),                       # -(0.25)^2 ln 0.75
    ('focal', math.log(3.0), 0.0, 0.4386322002),                       # -(0.75)^4 ln 0.25
    ('mse', math.log(3.0), 1.0, 0.0625),                               # 0.25^2
    ('vfl', math.log(3.0), 1.0, 0.2876820725),                         # -ln 0.75
])
def test_per_patch_loss_matches_hand_computed_values(loss_type, z, y, expected):
    cfg = CASSConfig(loss_type=loss_type, focal_alpha=2.0, focal_beta=4.0)
    value = cass.per_patch_loss(torch.tensor([z], dtype=torch.float64), torch.tensor([y], dtype=torch.float64), cfg)
    assert value.item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_per_patch_loss_is_finite_with_finite_gradient_for_extreme_logits(loss_type):
    z = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0])
    loss = cass.per_patch_loss(z, y, CASSConfig(loss_type=loss_type)).sum()
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------ normalisations
def random_batch(seed, patch_size=1, feat=FEAT, counts=(5, 0, 3, 7)):
    gen = torch.Generator().manual_seed(seed)
    gt = [random_boxes(gen, n) for n in counts]
    ph, pw = cass.patch_grid(feat, patch_size)
    logits = (torch.randn(len(counts), ph * pw, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    return logits, gt


@pytest.mark.parametrize('normalization, loss_type', list(itertools.product(NORMALIZATIONS, LOSS_TYPES)))
def test_every_normalisation_equals_loop_oracle_in_value_and_gradient(normalization, loss_type):
    for seed, (patch_size, feat, decay, subpixel) in enumerate([(1, FEAT, 'gaussian', True),
                                                                (4, (7, 9), 'linear', False)]):
        cfg = CASSConfig(normalization=normalization, loss_type=loss_type, decay_type=decay,
                         use_subpixel_offset=subpixel, bg_weight=0.7, focal_alpha=1.5, focal_beta=3.0)
        logits, gt = random_batch(10 + seed, patch_size, feat)
        value = cass.cass_loss(logits, gt, feat, IMG, patch_size, cfg)
        expected = oracle.oracle_cass_loss(logits, gt, feat, IMG, patch_size, cfg)
        (grad,) = torch.autograd.grad(value, logits)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-8)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize('normalization', NORMALIZATIONS)
def test_mode_functions_accept_precomputed_masks_and_float32(normalization):
    cfg = CASSConfig(normalization=normalization)
    logits, gt = random_batch(3)
    boxes, batch_idx = cass.pack_boxes(gt)
    masks = cass.soft_target_masks(boxes, batch_idx, FEAT, IMG, 1, cfg)
    mode_fn = getattr(cass, f'cass_loss_{normalization}')
    with_masks = mode_fn(logits, gt, FEAT, IMG, 1, cfg, masks=masks)
    torch.testing.assert_close(with_masks, cass.cass_loss(logits, gt, FEAT, IMG, 1, cfg))
    single = cass.cass_loss(logits.detach().float(), [b.float() for b in gt], FEAT, IMG, 1, cfg)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), with_masks.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('normalization, loss_type', list(itertools.product(NORMALIZATIONS, LOSS_TYPES)))
def test_batch_without_boxes_gives_zero_loss_with_a_gradient(normalization, loss_type):
    cfg = CASSConfig(normalization=normalization, loss_type=loss_type)
    logits = torch.randn(3, 60, requires_grad=True)
    gt = [torch.zeros(0, 4) for _ in range(3)]
    loss = cass.cass_loss(logits, gt, FEAT, IMG, 1, cfg)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert grad is not None and torch.equal(grad, torch.zeros_like(logits))


def test_object_balanced_gives_every_object_share_one_over_n_whatever_its_size():
    """The seeds' example: one large object and ten small ones, four of them inside the large one.

    The foreground term of object_balanced is linear in the per-patch losses: sum_p w_p l(z_p, Y_p) with
    w_p = sum_i s_i M_i[p] / sum_p M_i[p] and s_i the share of object i (claim: s_i = 1/N for every i).
    With the focal loss at alpha = beta = 0 (plain BCE) dl/dz = q - Y exactly, so on foreground patches
    (Y > 0, where the background term has no gradient) w_p = grad_p / (q_p - Y_p) is read off the autograd
    gradient. Regressing w onto the N normalised masks M_i / sum M_i (full column rank, checked) recovers
    every s_i; all must equal 1/N. Under the 'patch' normalisation the same read-out shows the large
    object's patches carrying many times a small object's weight (the density bias being fixed).
    """
    img, feat = (128, 128), (16, 16)                              # stride 8
    large = [[16.0, 16.0, 104.0, 104.0]]
    inside = [[24.0, 24.0, 36.0, 34.0], [70.0, 30.0, 80.0, 42.0], [30.0, 80.0, 44.0, 90.0], [60.0, 60.0, 70.0, 68.0]]
    outside = [[110.0, 4.0, 122.0, 14.0], [2.0, 110.0, 12.0, 124.0], [110.0, 110.0, 124.0, 122.0],
               [112.0, 56.0, 124.0, 66.0], [50.0, 110.0, 60.0, 122.0], [2.0, 50.0, 12.0, 60.0]]
    boxes = torch.tensor(large + inside + outside, dtype=torch.float64)
    n = len(boxes)
    cfg = CASSConfig(normalization='object_balanced', loss_type='focal', focal_alpha=0.0, focal_beta=0.0,
                     expansion_ratio=0.5, bg_weight=1.0)
    logits = torch.full((1, 256), -3.0, dtype=torch.float64, requires_grad=True)
    masks = torch.stack([oracle.box_mask(b, feat, img, 1, cfg) for b in boxes])       # [N, P]
    target = masks.max(0).values
    fg = target > 0
    basis = (masks / masks.sum(1, keepdim=True)).T[fg]                                  # [P_fg, N]
    assert torch.linalg.matrix_rank(basis) == n

    def patch_weights(normalization):
        loss = cass.cass_loss(logits, [boxes], feat, img, 1, cfg.__class__(**{**cfg.__dict__,
                                                                             'normalization': normalization}))
        (grad,) = torch.autograd.grad(loss, logits)
        return grad[0][fg] / (torch.sigmoid(logits.detach()[0][fg]) - target[fg])

    weights = patch_weights('object_balanced')
    shares = torch.linalg.lstsq(basis, weights[:, None]).solution[:, 0]
    torch.testing.assert_close(shares, torch.full((n,), 1.0 / n, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(basis @ shares, weights, atol=1e-12, rtol=1e-9)   # exact fit, no residual

    patch_w = torch.zeros(256, dtype=torch.float64)
    patch_w[fg] = patch_weights('patch')
    large_weight = (patch_w * (masks[0] > 0)).sum()
    small_weight = (patch_w * (masks[-1] > 0)).sum()
    assert large_weight > 5 * small_weight


# --------------------------------------------------------------------------------------------- config
def test_invalid_normalisation_error_lists_the_five_choices():
    with pytest.raises(ValueError) as err:
        CASSConfig(normalization='per_object')
    message = str(err.value)
    assert 'per_object' in message and 'normalization' in message
    assert all(repr(choice) in message for choice in NORMALIZATIONS)


@pytest.mark.parametrize('field, value', [('loss_type', 'bce'), ('decay_type', 'cosine'),
                                          ('expansion_ratio', -0.1), ('min_size', float('nan')),
                                          ('bg_weight', -1.0), ('spatial_reg', 'x'),
                                          ('use_subpixel_offset', 1), ('focal_alpha', -2.0)])
def test_invalid_config_values_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        CASSConfig(**{field: value})


def test_spatial_reg_adds_hand_computed_smoothness():
    """2 x 2 grid, q = [[0.1, 0.5], [0.3, 0.9]]: vertical |0.3-0.1|, |0.9-0.5| -> mean 0.3;
    horizontal |0.5-0.1|, |0.9-0.3| -> mean 0.5; smoothness 0.8, times lambda 0.5 = 0.4."""
    q = torch.tensor([[0.1, 0.5, 0.3, 0.9]], dtype=torch.float64)
    logits = torch.log(q / (1 - q))
    assert cass.spatial_smoothness(logits, (2, 2)).item() == pytest.approx(0.8, abs=1e-12)
    gt = [torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)]
    with_reg = cass.cass_loss(logits, gt, (2, 2), (32, 32), 1, CASSConfig(spatial_reg=0.5))
    without = cass.cass_loss(logits, gt, (2, 2), (32, 32), 1, CASSConfig(spatial_reg=0.0))
    assert (with_reg - without).item() == pytest.approx(0.4, abs=1e-12)


# ---------------------------------------------------------------------------------------------- diagnostics
@pytest.mark.parametrize('patch_size', [1, 4])
def test_spatial_stats_equal_loop_oracle(patch_size):
    gen = torch.Generator().manual_seed(5)
    img, feat = (320, 320), (10, 10)                        # stride 32: boxes of all three COCO sizes
    gt = [random_boxes(gen, 6, img, 200.0), random_boxes(gen, 0, img), random_boxes(gen, 8, img, 150.0)]
    ph, pw = cass.patch_grid(feat, patch_size)
    logits = torch.randn(3, ph * pw, generator=gen, dtype=torch.float64)
    cfg = CASSConfig(loss_type='vfl')
    stats = cass.cass_spatial_stats(logits, gt, feat, img, patch_size, cfg)
    expected = oracle.oracle_spatial_stats(logits, gt, feat, img, patch_size, cfg)
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, abs=1e-10), key
    assert all(expected[f'{s}_obj_loss_count'] > 0 for s in ('small', 'medium', 'large'))


def test_spatial_stats_without_boxes_are_zero_not_nan():
    stats = cass.cass_spatial_stats(torch.randn(2, 60), [torch.zeros(0, 4)] * 2, FEAT, IMG, 1, CASSConfig())
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats['small_obj_loss'].item() == 0.0 and stats['small_obj_loss_count'].item() == 0.0


@pytest.mark.parametrize('patch_size, keep_ratio', [(1, 0.3), (1, 0.7), (2, 0.5)])
def test_keep_bias_stats_equal_loop_oracle_and_accumulate(patch_size, keep_ratio):
    gen = torch.Generator().manual_seed(6)
    img, feat = (320, 320), (10, 10)
    gt = [random_boxes(gen, n, img, 220.0) for n in (5, 0, 7, 4)]
    ph, pw = cass.patch_grid(feat, patch_size)
    logits = torch.randn(4, ph * pw, generator=gen, dtype=torch.float64)
    cfg = CASSConfig(min_size=1.0)
    expected = oracle.oracle_keep_bias(logits, gt, feat, img, patch_size, keep_ratio, cfg, min_patches=2)
    # accumulate over two eval "batches", as an evaluator does
    halves = [cass.keep_bias_stats(logits[s], gt[s], feat, img, patch_size, keep_ratio, cfg, min_patches=2)
              for s in (slice(0, 2), slice(2, 4))]
    summed = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    result = cass.finalize_keep_bias(summed)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-10), key
    assert expected['num_boxes_far'] > 0 and expected['num_boxes_near'] > 0


def test_keep_count_follows_pruner_rule():
    assert cass.keep_count(60, 0.5) == 30
    assert cass.keep_count(60, 0.51) == 31           # ceil
    assert cass.keep_count(60, 0.0, min_patches=4) == 4
    assert cass.keep_count(60, 1.0, min_patches=100) == 60


def test_centroid_shift_is_negative_dy_when_scores_sit_above_target():
    """q = Y moved up one patch row -> centroid of q is higher -> dy < 0 (the reported symptom), dx = 0."""
    img, feat = (320, 320), (10, 10)
    gt = [torch.tensor([[100.0, 120.0, 220.0, 200.0]], dtype=torch.float64)]
    cfg = CASSConfig()
    target = cass.generate_soft_target_mask(gt, feat, img, 1, cfg).reshape(10, 10)
    shifted = torch.roll(target, shifts=-1, dims=0).clamp(1e-4, 1 - 1e-4).reshape(1, -1)
    logits = torch.log(shifted / (1 - shifted))
    result = cass.finalize_keep_bias(cass.keep_bias_stats(logits, gt, feat, img, 1, 0.5, cfg))
    assert result['centroid_dy'] == pytest.approx(-0.1, abs=0.01)      # one row of 32 px = 0.1 of H
    assert abs(result['centroid_dx']) < 1e-3
    assert result['num_images_centroid'] == 1.0


def test_several_pruned_levels_are_averaged_with_equal_weight():
    cfg = CASSConfig(normalization='object_balanced')
    gen = torch.Generator().manual_seed(8)
    gt = [random_boxes(gen, 4), random_boxes(gen, 2)]
    shapes = [(12, 20), (6, 10)]                                  # strides 8 and 16 of the 96 x 160 input
    logits = [torch.randn(2, h * w, generator=gen, dtype=torch.float64) for h, w in shapes]
    per_level = [oracle.oracle_cass_loss(z, gt, s, IMG, 1, cfg) for z, s in zip(logits, shapes)]
    value = cass.cass_loss_levels(logits, gt, shapes, IMG, 1, cfg)
    assert value.item() == pytest.approx(sum(per_level).item() / 2, abs=1e-12)
