"""PatchLevelPruner: top-k patches vs a loop oracle, index layout on partial patches, schedule, gate, CASS API."""
import math

import pytest
import torch

from src.zoo.rtdetr import cass
from src.zoo.rtdetr.patch_level_pruning import PatchLevelPruner

C = 16


def make_pruner(**kw):
    torch.manual_seed(0)
    kw.setdefault("input_dim", C)
    return PatchLevelPruner(**kw)


def oracle_patch_logits(pruner, tokens, h, w):
    """Loop over patches: mean of the predictor logits of the patch's real cells -> [B, P_h, P_w]."""
    k = pruner.patch_size
    with torch.no_grad():
        tok = pruner.importance_predictor(tokens).squeeze(-1).reshape(-1, h, w)
    p_h, p_w = math.ceil(h / k), math.ceil(w / k)
    out = torch.zeros(tok.shape[0], p_h, p_w)
    for i in range(p_h):
        for j in range(p_w):
            out[:, i, j] = tok[:, i * k:min(h, (i + 1) * k), j * k:min(w, (j + 1) * k)].mean((1, 2))
    return out


@pytest.mark.parametrize("h,w,patch_size,keep_ratio,expected_kept", [
    (16, 16, 4, 0.3, 5),      # P = 16, ceil(4.8) = 5
    (23, 40, 4, 0.3, 18),     # P = 6 * 10 = 60, 0.3 * 60 = 18 exactly
    (23, 40, 4, 0.5, 30),
    (5, 7, 2, 0.25, 3),       # P = 3 * 4 = 12
    (9, 9, 3, 0.6, 6),        # P = 9, ceil(5.4) = 6
])
def test_kept_patches_are_the_top_k_of_loop_oracle_patch_logits(h, w, patch_size, keep_ratio, expected_kept):
    pruner = make_pruner(patch_size=patch_size, keep_ratio=keep_ratio)
    tokens = torch.randn(3, h * w, C)
    _, _, info = pruner(tokens, (h, w))
    oracle = oracle_patch_logits(pruner, tokens, h, w)
    torch.testing.assert_close(info["patch_importance_scores"].detach(), oracle.flatten(1), atol=1e-6, rtol=1e-5)
    assert info["num_kept_patches"] == expected_kept
    assert info["patch_grid"] == (math.ceil(h / patch_size), math.ceil(w / patch_size))
    assert info["feat_shape"] == (h, w) and info["keep_ratio"] == keep_ratio and info["pruned"]
    expected = torch.argsort(oracle.flatten(1), dim=1, descending=True)[:, :expected_kept].sort(1).values
    assert torch.equal(info["kept_patch_idx"], expected)


@pytest.mark.parametrize("h,w,patch_size", [(23, 40, 4), (5, 7, 2), (16, 16, 4), (6, 10, 4)])
def test_kept_indices_are_real_cells_of_kept_patches_and_padding_slots_are_invalid(h, w, patch_size):
    pruner = make_pruner(patch_size=patch_size, keep_ratio=0.5)
    tokens = torch.randn(2, h * w, C)
    kept, idx, info = pruner(tokens, (h, w))
    k = patch_size
    p_w = math.ceil(w / k)
    n = info["num_kept_patches"]
    assert kept.shape == (2, n * k * k, C) and idx.shape == (2, n * k * k) and idx.dtype == torch.long
    assert info["kept_valid"].shape == idx.shape
    for b in range(2):
        expected_cells, valid_count = set(), 0
        for slot_patch, patch in enumerate(info["kept_patch_idx"][b].tolist()):
            pi, pj = divmod(patch, p_w)
            for s in range(k * k):
                slot = slot_patch * k * k + s
                r, c = pi * k + s // k, pj * k + s % k
                real = r < h and c < w
                assert bool(info["kept_valid"][b, slot]) == real
                index = int(idx[b, slot])
                assert 0 <= index < h * w
                assert (index // w // k, index % w // k) == (pi, pj)   # a real cell of the same patch
                if real:
                    assert index == r * w + c
                    expected_cells.add(index)
                    valid_count += 1
        valid_idx = idx[b][info["kept_valid"][b]].tolist()
        assert len(valid_idx) == len(set(valid_idx)) == valid_count
        assert set(valid_idx) == expected_cells
    assert info["num_kept_tokens"].item() == pytest.approx(info["kept_valid"].sum(1).float().mean().item())


def test_scatter_back_at_valid_indices_round_trips():
    h, w = 23, 40
    pruner = make_pruner(patch_size=4, keep_ratio=0.3)
    tokens = torch.randn(2, h * w, C)
    kept, idx, info = pruner(tokens, (h, w))
    valid = info["kept_valid"]
    canvas = torch.zeros_like(tokens)
    for b in range(2):
        canvas[b, idx[b][valid[b]]] = kept[b][valid[b]]
    regathered = torch.gather(canvas, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    assert torch.equal(regathered, kept.detach())
    kept_cells = torch.zeros(2, h * w, dtype=torch.bool)
    for b in range(2):
        kept_cells[b, idx[b][valid[b]]] = True
    assert torch.equal(canvas[kept_cells], tokens[kept_cells])
    assert (canvas[~kept_cells] == 0).all()


def test_warmup_schedule_holds_then_ramps_linearly_to_keep_ratio():
    pruner = make_pruner(keep_ratio=0.3, token_pruning_warmup_epochs=4)
    assert pruner.current_keep_ratio == 0.3                       # no set_epoch yet: schedule finished
    expected = {0: 1.0, 3: 1.0, 4: 1.0, 5: 0.825, 6: 0.65, 7: 0.475, 8: 0.3, 9: 0.3, 50: 0.3}
    for epoch, ratio in expected.items():
        pruner.set_epoch(epoch)
        assert pruner.current_keep_ratio == pytest.approx(ratio), epoch
    no_warmup = make_pruner(keep_ratio=0.3, token_pruning_warmup_epochs=0)
    no_warmup.set_epoch(0)
    assert no_warmup.current_keep_ratio == 0.3


def test_warmup_epoch_keeps_every_token_and_ramp_epoch_prunes_with_ramp_ratio():
    pruner = make_pruner(keep_ratio=0.3, token_pruning_warmup_epochs=2)
    tokens = torch.randn(1, 16 * 16, C)
    pruner.set_epoch(1)
    kept, idx, info = pruner(tokens, (16, 16))
    assert torch.equal(kept, tokens) and not info["pruned"]
    pruner.set_epoch(3)                                            # ratio 0.65 -> ceil(0.65 * 16) = 11
    _, _, info = pruner(tokens, (16, 16))
    assert info["keep_ratio"] == pytest.approx(0.65) and info["num_kept_patches"] == 11


@pytest.mark.parametrize("setup", ["ratio_one", "eval_without_pruning"])
def test_no_pruning_returns_all_tokens_unchanged(setup):
    if setup == "ratio_one":
        pruner = make_pruner(keep_ratio=1.0)
    else:
        pruner = make_pruner(keep_ratio=0.3, prune_in_eval=False).eval()
    h, w = 23, 40
    tokens = torch.randn(2, h * w, C)
    kept, idx, info = pruner(tokens, (h, w))
    assert torch.equal(kept, tokens)
    assert torch.equal(idx, torch.arange(h * w).expand(2, -1))
    assert info["kept_valid"].all() and info["kept_valid"].shape == (2, h * w)
    assert info["num_kept_patches"] == 60 and info["keep_ratio"] == 1.0 and not info["pruned"]
    assert info["num_kept_tokens"].item() == h * w
    assert info["patch_importance_scores"].shape == (2, 60)


def test_eval_with_prune_in_eval_uses_the_schedule_ratio():
    pruner = make_pruner(keep_ratio=0.25, prune_in_eval=True).eval()
    _, _, info = pruner(torch.randn(1, 256, C), (16, 16))
    assert info["pruned"] and info["num_kept_patches"] == 4


def test_straight_through_gate_keeps_values_and_sends_gradient_to_predictor():
    h, w = 23, 40
    tokens = torch.randn(2, h * w, C, requires_grad=True)
    gated = make_pruner(keep_ratio=0.3, straight_through_gate=True)
    plain = make_pruner(keep_ratio=0.3, straight_through_gate=False)
    plain.load_state_dict(gated.state_dict())
    kept_g, idx_g, _ = gated(tokens, (h, w))
    kept_p, idx_p, _ = plain(tokens, (h, w))
    assert torch.equal(idx_g, idx_p)
    assert torch.equal(kept_g, kept_p)
    (kept_g ** 2).sum().backward()
    grads = [p.grad for p in gated.importance_predictor.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    (kept_p ** 2).sum().backward()
    assert all(p.grad is None for p in plain.importance_predictor.parameters())


def test_min_patches_lower_bounds_the_kept_patches():
    tokens = torch.randn(1, 23 * 40, C)
    _, _, info = make_pruner(keep_ratio=0.01, min_patches=5)(tokens, (23, 40))   # ceil(0.6) = 1 < 5
    assert info["num_kept_patches"] == 5
    kept, _, info = make_pruner(keep_ratio=0.01, min_patches=100)(tokens, (23, 40))  # capped at P = 60
    assert info["num_kept_patches"] == 60 and not info["pruned"] and torch.equal(kept, tokens)


def test_kept_patch_count_is_cass_keep_count_for_many_grids():
    pruner = make_pruner(patch_size=2, keep_ratio=0.07, min_patches=3)
    # P = 100: 0.07 * 100 = 7.000000000000001 in floats, 7 patches (no float-noise extra one); P = 4: min_patches 3;
    # P = 210: ceil(14.7) = 15; P = 400: 28
    for (h, w), expected in (((20, 20), 7), ((3, 3), 3), ((19, 41), 15), ((40, 40), 28)):
        _, _, info = pruner(torch.randn(1, h * w, C), (h, w))
        num_patches = math.ceil(h / 2) * math.ceil(w / 2)
        assert info["num_kept_patches"] == cass.keep_count(num_patches, 0.07, 3) == expected


@pytest.mark.parametrize("key,value", [("keep_ratio", 0.0), ("keep_ratio", 1.5), ("patch_size", 0),
                                       ("min_patches", 0), ("token_pruning_warmup_epochs", -1)])
def test_invalid_settings_raise_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        make_pruner(**{key: value})


def test_invalid_cass_settings_are_rejected_naming_the_dset_key():
    with pytest.raises(ValueError, match=r"dset\.cass_normalization\) = 'no_such_mode' is not valid; choose one of "
                                         r"'patch', 'object'"):
        cass.CASSConfig(normalization="no_such_mode")
    with pytest.raises(ValueError, match=r"dset\.cass_bg_weight\) = -1\.0 is not valid; it must be a finite number >= 0"):
        cass.CASSConfig(bg_weight=-1.0)


def test_tokens_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="h\\*w"):
        make_pruner()(torch.randn(1, 100, C), (9, 9))


# ------------------------------------------------------------------ the seeds' CASS names
def test_the_seeds_cass_names_are_the_functions_training_calls():
    """The fork promises compute_cass_loss_object_normalized and the area-weight / target helpers by name:
    they are the very functions the training loss dispatches to (not wrappers a test alone would call)."""
    from src.zoo.rtdetr import cass_losses, patch_level_pruning as plp

    assert plp.compute_cass_loss_object_normalized is cass.cass_loss_object
    assert cass_losses._MODES["object"] is cass.cass_loss_object
    assert plp.compute_patch_area_weight is cass.patch_area_weight
    assert plp.generate_soft_target_mask is cass.generate_soft_target_mask


def test_the_pruner_takes_no_cass_settings():
    with pytest.raises(TypeError, match="cass_normalization"):
        PatchLevelPruner(input_dim=C, cass_normalization="object")


@pytest.mark.parametrize("h,w,k", [(3, 2, 4), (1, 9, 4), (7, 13, 3), (40, 23, 8), (16, 16, 4)])
def test_patch_mean_logits_equal_the_loop_over_real_cells_in_value_and_gradient(h, w, k):
    """Maps smaller than a patch, ragged right / bottom edges and whole patches: each patch's mean over its real
    cells (the partial edge patches divide by their real cells, not k^2), and the same gradient."""
    from src.zoo.rtdetr.patch_level_pruning import patch_mean_logits

    tok = torch.randn(2, h * w, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p_h, p_w = math.ceil(h / k), math.ceil(w / k)
    grid = tok.reshape(2, h, w)
    ref = torch.stack([grid[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((1, 2))
                       for i in range(p_h) for j in range(p_w)], 1)              # slicing stops at the edge
    got = patch_mean_logits(tok, (h, w), k)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    weights = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_got, = torch.autograd.grad((got * weights).sum(), tok)
    g_ref, = torch.autograd.grad((ref * weights).sum(), tok)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-12)
