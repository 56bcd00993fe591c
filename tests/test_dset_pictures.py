"""The DSET TensorBoard picture: three titled panels over the input (target mask, predicted keep probability,
kept top-K) with a colour bar, GT boxes, the kept patches outlined and the pruned area dimmed."""
from __future__ import annotations

import numpy as np
import torch

from src.misc.visualize import mask_panels_figure, patch_rects
from src.zoo.rtdetr.dset_config import validate_dset
from src.zoo.rtdetr.dset_hooks import cass_mask_figure
from src.zoo.rtdetr.patch_level_pruning import PatchLevelPruner


def _pruned_info():
    torch.manual_seed(0)
    pruner = PatchLevelPruner(input_dim=16, patch_size=2, keep_ratio=0.25).eval()
    _, _, info = pruner(torch.randn(1, 8 * 12, 16), (8, 12))   # 8 x 12 map: input 64 x 96 at stride 8
    assert info["pruned"]
    return info


def test_mask_panels_have_titles_colour_bar_and_dim_exactly_the_pruned_patches():
    info = _pruned_info()
    image = np.full((64, 96, 3), 0.8, np.float32)
    kept = patch_rects(info["kept_patch_idx"][0], info["patch_grid"], (16, 16), (64, 96))
    gt = torch.tensor([[10.0, 10.0, 40.0, 30.0]])
    fig = mask_panels_figure(image, gt, np.zeros((64, 96)), np.ones((64, 96)) * 0.5, kept)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["target mask (CASS)", "predicted keep probability",
                                                 f"kept top-K: {info['num_kept_patches']} patches"]
    assert any(ax.get_ylabel() == "target / keep probability" for ax in fig.axes)   # the colour bar
    shown = panels[2].images[0].get_array()
    # independent reference: brightness 0.8 inside a kept patch (16 x 16 px), 0.8 x 0.35 elsewhere
    ref = np.full((64, 96), 0.8 * 0.35)
    for p in info["kept_patch_idx"][0].tolist():
        r, c = divmod(p, info["patch_grid"][1])
        ref[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 0.8
    np.testing.assert_allclose(np.asarray(shown)[..., 0], ref, atol=1e-6)
    assert len(panels[2].collections) == 2 and len(panels[0].collections) == 1       # kept + GT, GT


def test_cass_mask_figure_renders_the_hook_picture_as_uint8_rgb():
    info = _pruned_info()
    dset = validate_dset({"patch_size": 2, "keep_ratio": 0.25})
    pic = cass_mask_figure(torch.rand(3, 64, 96), torch.tensor([[10.0, 10.0, 40.0, 30.0]]), info, dset)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3 and pic.shape[1] > 2 * pic.shape[0]
