"""CASS (Context-Aware Soft Supervision): the public API of the maths of docs/cass_maths.md.

The code lives in three modules of pure, vectorised functions (shape docstrings there):
- `cass_targets`: `CASSConfig`, the patch geometry, per-box soft masks M_i [N, P], merged target Y [B, P];
- `cass_losses`: the per-patch loss (one definition per loss type) and the five normalisations;
- `cass_metrics`: diagnostics and the keep-bias metrics (keep-recall per size / region, centroid shift).
This module re-exports them, so `from src.zoo.rtdetr import cass; cass.cass_loss(...)` keeps working.
"""
from src.zoo.rtdetr.cass_losses import (LossPolynomial, cass_loss, cass_loss_area_patch, cass_loss_levels,  # noqa: F401
                                        cass_loss_object, cass_loss_object_area, cass_loss_object_balanced,
                                        cass_loss_patch, cass_score_gradient_norm, loss_polynomial,
                                        per_object_loss_sums,
                                        per_object_mean_loss, per_patch_loss, spatial_smoothness)
from src.zoo.rtdetr.cass_metrics import (LEVEL_SEP, bias_tag, cass_spatial_stats,  # noqa: F401
                                         finalize_keep_bias, keep_bias_stats, keep_count, level_name,
                                         top_k_mask)
from src.zoo.rtdetr.cass_targets import (DECAY_TYPES, LARGE_AREA, LOSS_TYPES, NORMALIZATIONS,  # noqa: F401
                                         REGIONS, SIZE_BUCKETS, SMALL_AREA, CASSConfig, box_area_fraction,
                                         boxes_to_cells, core_masks, generate_soft_target_mask,
                                         merge_target_masks, pack_boxes, patch_area_weight, patch_centres,
                                         patch_centres_pixels, patch_grid, per_box_dot, size_bucket,
                                         soft_target_masks)
