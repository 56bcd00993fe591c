"""CASS bias bench: which `dset.cass_normalization` makes the DSET pruner keep near / large objects?

For every normalisation mode the bench trains a small model built from the repo's modules (PResNet-18-vd ->
1x1 conv + BN projection to 256 channels on P4 and P5, as the encoder's input_proj -> one PatchLevelPruner
per level) on the CASS loss alone, for the same number of steps, with the same optimiser, learning rate,
seeds and data order for every mode. It then scores the pruner's patch logits on the validation images
with `cass.keep_bias_stats` / `cass.finalize_keep_bias` at the keep ratio (P4 and P5 pooled, as the trainer
does) and prints one markdown table: keep-recall per COCO size bucket and per region (far = box centre in
the top half, near = bottom half) beside the oracle that keeps the top-K of the target, the centroid shift
of the scores against the target (dy < 0: the scores sit higher in the image than the objects), and the
per-patch loss in the top-left quadrant and the bottom half (`cass.cass_spatial_stats`).

    python tools/cass_bias_bench.py                                  # defaults: about 6 min on 2 quiet CPU cores
    python tools/cass_bias_bench.py --seeds 0 1 2 --out output/cass_bias/seeds012.json

Everything is deterministic for a seed: the model is initialised from `torch.manual_seed(seed)` (the same
initial weights for every mode) and batch b of pass e over the training set is fixed by the seed. There is
no augmentation (Resize only), so the training images are decoded once and shared by all runs.

With `--detection-loss` the bench trains the full RT-DETRv2-R18 + DSET detector of
configs/dset4_r18_synth_cpu.yaml instead (detection losses + the mode's `cass_loss_weight` * CASS; patch size,
keep ratio, normalisation and context band set from the bench, no pruning warmup); it is much slower
(10-20 s a step on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from src.core.run_config import load_run_config
from src.data.coco_dataset import CocoDetection
from src.data.collate import BatchImageCollateFunction
from src.data.synthetic_roadside import ensure_dataset
from src.data.transforms import Compose, ConvertPILImage, Resize
from src.nn.backbone.presnet import PResNet
from src.zoo.rtdetr import cass
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.patch_level_pruning import PatchLevelPruner

DETECTOR_CONFIG = "dset4_r18_synth_cpu.yaml"   # under configs/
PRUNED_STAGES = (2, 3)        # PResNet stages whose outputs are P4 (stride 16) and P5 (stride 32)
HIDDEN_DIM = 256              # the encoder's hidden_dim: input_proj output and pruner token dim
BIAS_GROUPS = cass.SIZE_BUCKETS + cass.REGIONS
SPATIAL_KEYS = ("top_left_loss", "bottom_loss", "small_obj_loss", "medium_obj_loss", "large_obj_loss")


@dataclass(frozen=True)
class BenchMode:
    """One table row: a CASS normalisation and its context band, as in the config it stands for.

    loss_weight is `dset.cass_loss_weight` of that config; it only matters with --detection-loss (alone,
    the CASS loss is trained unweighted: a constant factor barely changes AdamW's steps), so scheme A is
    then exactly `patch` with r = 0.3.
    """
    key: str
    label: str
    normalization: str
    expansion_ratio: float
    loss_weight: float
    config: str

    def cass_config(self) -> cass.CASSConfig:
        """The CASS settings of the configs (focal loss, gaussian band, min size 2, sub-pixel boxes)."""
        return cass.CASSConfig(normalization=self.normalization, expansion_ratio=self.expansion_ratio)


MODES: Dict[str, BenchMode] = {m.key: m for m in (
    BenchMode("patch", "patch (original, r=0.8)", "patch", 0.8, 0.05, "configs/dset4_r18_ratio0.3.yaml"),
    BenchMode("A", "A: patch (r=0.3)", "patch", 0.3, 0.01, "configs/dset4_r18_ratio0.3_A.yaml"),
    BenchMode("object", "B: object (r=0.3)", "object", 0.3, 0.05, "configs/dset4_r18_ratio0.3_B_r0.3.yaml"),
    BenchMode("object_area", "C: object_area (r=0.3)", "object_area", 0.3, 0.05,
              "configs/dset4_r18_ratio0.3_C_r0.3.yaml"),
    BenchMode("area_patch", "area_patch (r=0.3)", "area_patch", 0.3, 0.05, "configs/dset4_r18_ratio0.3_area_patch_r0.3.yaml"),
    BenchMode("object_balanced", "object_balanced (r=0.3)", "object_balanced", 0.3, 0.05,
              "configs/dset4_r18_ratio0.3_balanced_r0.3.yaml"),
)}
INIT_ROW = "untrained (step 0)"


@dataclass(frozen=True)
class BenchSettings:
    """Everything that changes the numbers (all modes share it).

    input_size: (H, W) the images are resized to (multiples of 32 avoid padding); the COCO size buckets use
    box areas in these input pixels, as the trainer's evaluation does.
    patch_size: pruner patch side in feature cells, the same on P4 and P5.
    """
    data: str = "dataset/roadside_synth"
    steps: int = 100
    batch_size: int = 4
    input_size: Tuple[int, int] = (224, 384)
    patch_size: int = 1
    keep_ratio: float = 0.3
    min_patches: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    eval_batch_size: int = 8
    detection_loss: bool = False
    pretrained: Optional[str] = None


# ------------------------------------------------------------------------------------------------ data
def load_split(data_dir: str, split: str, input_size: Sequence[int]) -> List[tuple]:
    """The split's (image float [3, H, W], target) samples after Resize(input_size), decoded once."""
    dataset = CocoDetection(img_folder=os.path.join(data_dir, "images", split),
                            ann_file=os.path.join(data_dir, "annotations", f"instances_{split}.json"),
                            transforms=Compose([Resize(size=list(input_size)), ConvertPILImage()]))
    return [dataset[i] for i in range(len(dataset))]


def batch_order(num_samples: int, batch_size: int, steps: int, seed: int) -> List[List[int]]:
    """Sample indices of each training step: passes over a seeded permutation, the last short batch dropped.

    If the set is smaller than a batch, every batch is the whole (permuted) set.
    """
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, num_samples)
    batches: List[List[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(num_samples, generator=generator).tolist()
        batches.extend(perm[i:i + size] for i in range(0, num_samples - size + 1, size))
    return batches[:steps]


# ----------------------------------------------------------------------------------------------- models
class PrunerBenchModel(nn.Module):
    """PResNet-18-vd -> per level (P4, P5) 1x1 conv + BN to 256 channels -> PatchLevelPruner.

    forward(images [B, 3, H, W]) -> list of the two pruners' info dicts (`patch_importance_scores` [B, P_l]
    logits, `feat_shape` (h_l, w_l), ...).
    """

    def __init__(self, settings: BenchSettings, mode: BenchMode):
        super().__init__()
        self.backbone = PResNet(depth=18, variant="d", num_stages=4, return_idx=list(PRUNED_STAGES),
                                pretrained=settings.pretrained or False)
        self.input_proj = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, HIDDEN_DIM, kernel_size=1, bias=False), nn.BatchNorm2d(HIDDEN_DIM))
            for c in self.backbone.out_channels)
        self.pruners = nn.ModuleList(PatchLevelPruner(
            input_dim=HIDDEN_DIM, patch_size=settings.patch_size, keep_ratio=settings.keep_ratio,
            min_patches=settings.min_patches, prune_in_eval=True, token_pruning_warmup_epochs=0)
            for _ in self.backbone.out_channels)  # the mode is the loss's (mode.cass_config()), not the pruner's

    def forward(self, images: Tensor) -> List[dict]:
        infos = []
        for feat, proj, pruner in zip(self.backbone(images), self.input_proj, self.pruners):
            x = proj(feat)
            _, _, info = pruner(x.flatten(2).transpose(1, 2), x.shape[-2:])
            infos.append(info)
        return infos

    def prune_infos(self, images: Tensor) -> List[dict]:
        return self(images)

    def training_loss(self, images: Tensor, targets: List[dict], cfg: cass.CASSConfig, settings: BenchSettings,
                      mode: BenchMode) -> Tuple[Tensor, Tensor]:
        """(loss to minimise, CASS loss): both the unweighted mean over levels of the mode's CASS loss."""
        loss = _cass_of_infos(self(images), targets, images, cfg, settings)
        return loss, loss


class DetectorBenchModel(nn.Module):
    """The full RT-DETRv2-R18 + DSET detector of DETECTOR_CONFIG, pruner settings from the bench (--detection-loss)."""

    def __init__(self, settings: BenchSettings, mode: BenchMode):
        super().__init__()
        overrides = {
            "input_size": list(settings.input_size),
            "PResNet": {"pretrained": settings.pretrained or False},
            "dset": {"patch_size": settings.patch_size, "keep_ratio": settings.keep_ratio,
                     "min_patches": settings.min_patches, "token_pruning_warmup_epochs": 0,
                     "cass_normalization": mode.normalization, "cass_expansion_ratio": mode.expansion_ratio,
                     "cass_loss_weight": mode.loss_weight, "cass_warmup_epochs": 0, "vis_interval": 0},
        }
        self.config = load_run_config(DETECTOR_CONFIG, overrides)
        self.detector = self.config.model
        self.criterion = self.config.criterion

    def prune_infos(self, images: Tensor) -> List[dict]:
        return self.detector(images)["dset_prune_info"]

    def training_loss(self, images, targets, cfg, settings, mode) -> Tuple[Tensor, Tensor]:
        """(detection losses + weighted DSET losses, unweighted CASS loss), as the trainer sums them."""
        outputs = self.detector(images, targets)
        losses = self.criterion(outputs, targets, epoch=0)  # DSETCriterion: detection + weighted DSET terms
        return sum(losses.values()), _cass_of_infos(outputs["dset_prune_info"], targets, images, cfg, settings)


def _cass_of_infos(infos: List[dict], targets: List[dict], images: Tensor, cfg: cass.CASSConfig,
                   settings: BenchSettings) -> Tensor:
    gt = dl.targets_to_abs_xyxy(targets, images.shape[-2:])
    return cass.cass_loss_levels([i["patch_importance_scores"] for i in infos], gt,
                                 [i["feat_shape"] for i in infos], tuple(images.shape[-2:]), settings.patch_size, cfg)


def build_model(settings: BenchSettings, mode: BenchMode, seed: int) -> nn.Module:
    """The bench model of the settings, initialised from `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    cls = DetectorBenchModel if settings.detection_loss else PrunerBenchModel
    return cls(settings, mode)


# ------------------------------------------------------------------------------------------- train / eval
def train(model: nn.Module, samples: List[tuple], settings: BenchSettings, mode: BenchMode, seed: int) -> dict:
    """AdamW (one lr for every parameter, constant) for settings.steps steps; returns the CASS loss curve."""
    collate = BatchImageCollateFunction(size_divisibility=32)
    cfg = mode.cass_config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    curve = []
    for indices in batch_order(len(samples), settings.batch_size, settings.steps, seed):
        images, targets = collate([samples[i] for i in indices])
        total, cass_value = model.training_loss(images, targets, cfg, settings, mode)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        curve.append(cass_value.detach())
    values = torch.stack(curve).tolist() if curve else []
    tail = values[-10:]
    return {"loss_cass_curve": values, "loss_cass_first": values[0] if values else None,
            "loss_cass_final": sum(tail) / len(tail) if tail else None}


@torch.no_grad()
def evaluate_bias(model: nn.Module, samples: List[tuple], settings: BenchSettings, cfg: cass.CASSConfig) -> dict:
    """Keep-bias metrics of the pruner on `samples`, P4 and P5 pooled (sums over levels and images).

    Returns `cass.finalize_keep_bias` of the pooled sums plus the spatial stats (`cass_spatial_stats`)
    pooled by their counts, all as floats.
    """
    collate = BatchImageCollateFunction(size_divisibility=32)
    model.eval()
    bias_sums: Dict[str, Tensor] = {}
    spatial_sums: Dict[str, Tensor] = {}
    for start in range(0, len(samples), settings.eval_batch_size):
        images, targets = collate(samples[start:start + settings.eval_batch_size])
        img_shape = tuple(images.shape[-2:])
        gt = dl.targets_to_abs_xyxy(targets, img_shape)
        for info in model.prune_infos(images):
            logits, feat_shape = info["patch_importance_scores"], info["feat_shape"]
            stats = cass.keep_bias_stats(logits, gt, feat_shape, img_shape, settings.patch_size,
                                         settings.keep_ratio, cfg, min_patches=settings.min_patches)
            for k, v in stats.items():
                bias_sums[k] = bias_sums.get(k, 0) + v.double()
            spatial = cass.cass_spatial_stats(logits, gt, feat_shape, img_shape, settings.patch_size, cfg)
            for k in SPATIAL_KEYS:
                count = spatial[k + "_count"].double()
                spatial_sums[k] = spatial_sums.get(k, 0) + spatial[k].double() * count
                spatial_sums[k + "_count"] = spatial_sums.get(k + "_count", 0) + count
    result = cass.finalize_keep_bias(bias_sums)
    for k in SPATIAL_KEYS:
        count = float(spatial_sums[k + "_count"])
        result[k] = float(spatial_sums[k]) / count if count > 0 else 0.0
    return result


def run_mode(mode: BenchMode, seed: int, settings: BenchSettings, train_samples, val_samples) -> dict:
    """Train one mode with one seed and evaluate it: {'mode', 'seed', 'seconds', metrics..., loss curve}."""
    start = time.perf_counter()
    model = build_model(settings, mode, seed)
    losses = train(model, train_samples, settings, mode, seed)
    metrics = evaluate_bias(model, val_samples, settings, mode.cass_config())
    return {"mode": mode.key, "seed": seed, **metrics, **losses, "seconds": time.perf_counter() - start}


def run_untrained(seed: int, settings: BenchSettings, val_samples) -> dict:
    """The randomly initialised model (seed), scored against the original `patch` target: chance level."""
    mode = MODES["patch"]
    model = build_model(settings, mode, seed)
    return {"mode": INIT_ROW, "seed": seed, **evaluate_bias(model, val_samples, settings, mode.cass_config())}


def run_bench(settings: BenchSettings, modes: Sequence[str], seeds: Sequence[int], include_untrained: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Train and score every (mode, seed); returns {'settings', 'runs': [...], 'summary': {row: {metric: stats}}}.

    summary[row][metric] = {'mean', 'std' (sample std over seeds; 0 for one seed), 'values'}; rows are
    the untrained model, the modes, and 'oracle (r=...)' rows for the top-K of the target.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    # the synthetic roadside set as `make data` renders it (48 train / 16 val, 640x360, seed 0) if it is absent
    ensure_dataset(settings.data, num_train=48, num_val=16, seed=0, log=lambda message: log(f"[bench] {message}"))
    train_samples = load_split(settings.data, "train", settings.input_size)
    val_samples = load_split(settings.data, "val", settings.input_size)
    runs = []
    for seed in seeds:
        if include_untrained:
            runs.append(run_untrained(seed, settings, val_samples))
        for key in modes:
            run = run_mode(MODES[key], seed, settings, train_samples, val_samples)
            log(f"[bench] seed {seed} {key:16s} CASS loss {run['loss_cass_first']:.4f} -> "
                f"{run['loss_cass_final']:.4f}  keep-recall large {run['keep_recall_large']:.3f} "
                f"near {run['keep_recall_near']:.3f}  dy {run['centroid_dy']:+.4f}  ({run['seconds']:.0f}s)")
            runs.append(run)
    return {"settings": asdict(settings), "modes": {k: asdict(MODES[k]) for k in modes}, "seeds": list(seeds),
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Mean and std over seeds of every numeric metric, per row (mode), plus one oracle row per context band."""
    summary: Dict[str, Dict[str, dict]] = {}
    grouped: Dict[str, List[dict]] = {}
    for run in runs:
        grouped.setdefault(run["mode"], []).append(run)
        if run["mode"] in MODES:
            oracle = {f"keep_recall_{g}": run[f"oracle_keep_recall_{g}"] for g in BIAS_GROUPS}
            oracle.update({f"num_boxes_{g}": run[f"num_boxes_{g}"] for g in BIAS_GROUPS})
            grouped.setdefault(f"oracle (r={MODES[run['mode']].expansion_ratio:g})", []).append(oracle)
    for row, items in grouped.items():
        keys = [k for k, v in items[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "seed"]
        summary[row] = {}
        for k in keys:
            values = [float(item[k]) for item in items if item.get(k) is not None]
            if values:
                summary[row][k] = {"mean": statistics.fmean(values),
                                   "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "values": values}
    return summary


# ------------------------------------------------------------------------------------------------ output
TABLE_COLUMNS = [("keep_recall_small", "KR small"), ("keep_recall_medium", "KR medium"),
                 ("keep_recall_large", "KR large"), ("keep_recall_far", "KR far"), ("keep_recall_near", "KR near"),
                 ("centroid_dx", "centroid dx"), ("centroid_dy", "centroid dy"),
                 ("top_left_loss", "top-left loss"), ("bottom_loss", "bottom loss"),
                 ("loss_cass_final", "final CASS loss")]


def _cell(stats: Optional[dict], signed: bool, show_std: bool) -> str:
    if stats is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(stats["mean"])
    return f"{text} ± {stats['std']:.3f}" if show_std else text


def _oracle_rows(summary: Dict[str, Dict[str, dict]]) -> Tuple[List[str], Dict[str, str]]:
    """The oracle rows to show and their labels: one row when every context band gives the same oracle."""
    rows = sorted(r for r in summary if r.startswith("oracle"))
    means = [{k: v["mean"] for k, v in summary[r].items()} for r in rows]
    same = all(m.keys() == means[0].keys() and all(math.isclose(m[k], means[0][k], rel_tol=1e-9, abs_tol=1e-12)
                                                    for k in m) for m in means[1:])
    if len(rows) > 1 and same:
        bands = ", ".join(r[len("oracle ("):-1] for r in rows)
        return rows[:1], {rows[0]: f"oracle: top-K of the target ({bands})"}
    return rows, {r: f"oracle: top-K of the target ({r[len('oracle ('):-1]})" for r in rows}


def format_table(summary: Dict[str, Dict[str, dict]], show_std: bool) -> str:
    """One markdown table: oracle row(s) first, then the untrained model, then the modes in bench order."""
    oracle_rows, label = _oracle_rows(summary)
    mode_rows = [r for r in summary if not r.startswith("oracle")]
    label.update({m.key: m.label for m in MODES.values()})
    lines = ["| row | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for row in oracle_rows + mode_rows:
        cells = [_cell(summary[row].get(key), key.startswith("centroid"), show_std and not row.startswith("oracle"))
                 for key, _ in TABLE_COLUMNS]
        lines.append(f"| {label.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_counts(summary: Dict[str, Dict[str, dict]]) -> str:
    """The number of scored boxes per group (val set, P4 + P5 levels counted separately)."""
    row = next((r for r in summary if r.startswith("oracle")), None)
    if row is None:
        return ""
    counts = ", ".join(f"{g} {summary[row][f'num_boxes_{g}']['mean']:.0f}" for g in BIAS_GROUPS)
    return f"Boxes scored (val, summed over the two levels): {counts}."


def parse_args(argv=None) -> argparse.Namespace:
    defaults = BenchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=defaults.data, help="synthetic roadside set (generated there if absent)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps per mode and seed")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--input-size", type=int, nargs=2, default=list(defaults.input_size), metavar=("H", "W"))
    p.add_argument("--patch-size", type=int, default=defaults.patch_size, help="pruner patch side (cells, P4 and P5)")
    p.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio)
    p.add_argument("--min-patches", type=int, default=defaults.min_patches)
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW lr of every parameter (constant)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-untrained", action="store_true", help="leave out the untrained-model row")
    p.add_argument("--detection-loss", action="store_true",
                   help=f"train the full detector of configs/{DETECTOR_CONFIG} (detection + weighted CASS loss); slow")
    p.add_argument("--pretrained", default=None, help="local PResNet-18-vd state-dict file for the backbone")
    p.add_argument("--out", default=None, help="write the machine-readable results (JSON) here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = BenchSettings(data=args.data, steps=args.steps, batch_size=args.batch_size,
                             input_size=tuple(args.input_size), patch_size=args.patch_size,
                             keep_ratio=args.keep_ratio, min_patches=args.min_patches, lr=args.lr,
                             weight_decay=args.weight_decay, detection_loss=args.detection_loss,
                             pretrained=args.pretrained)
    start = time.perf_counter()
    result = run_bench(settings, args.modes, args.seeds, include_untrained=not args.no_untrained,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    result["seconds_total"] = time.perf_counter() - start
    result["torch_threads"] = torch.get_num_threads()
    print(format_table(result["summary"], show_std=len(args.seeds) > 1))
    print()
    print(format_counts(result["summary"]))
    height, width = settings.input_size
    print(f"{len(args.seeds)} seed(s) {args.seeds}, {settings.steps} steps, batch {settings.batch_size}, input "
          f"H x W {height}x{width}, patch {settings.patch_size}, keep {settings.keep_ratio}, lr {settings.lr}, "
          f"{'detection + CASS' if settings.detection_loss else 'CASS only'}; {result['seconds_total']:.0f}s on "
          f"{torch.get_num_threads()} threads")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
