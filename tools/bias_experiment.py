"""The CASS bias experiment on a trained detector, in one command (docs/cass_bias.md).

    python tools/bias_experiment.py --profile cpu                    # 3 seeds on the 2-core machine, resumable
    python tools/bias_experiment.py --profile cpu --seeds 0          # one seed (one session's worth)
    python tools/bias_experiment.py --profile gpu --amp              # 3 seeds on the GPUs, parallel jobs
    python tools/bias_experiment.py --profile smoke --out /tmp/bias  # CPU, a few minutes, used by a test

Every training run is `train.py` in a subprocess, as a user runs it (no second training loop). Per seed:
- stage 1: the plain RT-DETRv2-R18 (encoder on P4 and P5, no DSET) trained on the synthetic roadside set,
  one stage 1 per seed (the seed spread includes the pretraining); its evaluations are the learning curve;
- the strength scales: on stage-1 features (the DSET model of the seed, stage-1 weights, eval mode, the
  first `strength_images` train images) the gradient norm CASS sends to the pruner scores, per cell; a
  `matched` cell's weight is `weight * scale`, scale = norm of `patch` at the same r / norm of the cell, so
  every matched mode starts with the gradient strength of `patch` (logged in the json as `strength`);
- step 0: an evaluation of the DSET model before tuning, per r (the same weights for every DSET cell of a
  seed: same stage 1, same seed, the normalisation has no parameters; r changes the target and oracle
  figures only), recorded as step 0 of every DSET cell; the plain control's step 0 is stage 1's last
  evaluation;
- stage 2, per cell: tuned from stage 1 (`-t`) with an evaluation every `stage2_iters` steps (the time
  course). Cells: the controls `plain_continue` (DSET off, same steps and lr) and `cass_w0` (DSET on, CASS
  weight 0), `patch` r 0.8 / 0.3 as proposed, the strength-matched modes and the per-level mode; the
  `extra_cells` (the same modes at their raw weight, "as proposed") run on `extra_seeds` for
  `extra_stage2_epochs`.
Resumable at two levels: a run whose `done.json` exists is skipped, one with a `last.pth` is resumed
(`-r`); and a run whose records are already in --out/bias_experiment.json (same protocol) is not run again,
so the seeds can be run in separate sessions (`--seeds 0`, then `--seeds 1`, ...) and the json collects
them. Every record names the git commit it ran from.

Output in --out (default docs/results/): bias_experiment.json (one record per evaluation: cell, seed, steps,
AP, keep-recall pooled / per level / per val half, target diagnostics; `strength`, `target_stats`,
`commit`), bias_experiment.md (last step, mean +- std; paired differences against patch r0.8 with 95 %
intervals; the mode chosen on val half 0 and reported on half 1), bias_experiment.png (per cell),
bias_time_course.png (KR near / far against steps), masks/<cell>.png. Work files go to --work (default
output/bias_experiment/<profile>).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python tools/bias_experiment.py` from anywhere
    sys.path.insert(0, str(REPO))

from src.core.run_config import run_config as build_run_config  # noqa: E402  (the tools' one config builder)
from src.core.run_config import write_run_config  # noqa: E402
from src.misc.provenance import git_commit  # noqa: E402
from src.data.synthetic_roadside import ensure_dataset, loader_config  # noqa: E402
from src.zoo.rtdetr.cass_targets import NORMALIZATIONS  # noqa: E402  (the one mode list)

PROTOCOL_VERSION = 2     # 1: docs/results/v1 (one evaluation after 40 steps, shared stage 1, no controls)
GROUPS = ('small', 'medium', 'large', 'far', 'near')
LEVELS = ('P4', 'P5')
HALVES = ('half0', 'half1')
TARGET_KEYS = ('target_bottom_share', 'kept_bottom_share', 'bottom_keep_ratio', 'target_positive_share',
               'keep_fraction')
SHORT = {'patch': 'p', 'object': 'o', 'object_area': 'oa', 'area_patch': 'ap', 'object_balanced': 'ob'}
BIAS_KEYS = ([f'keep_recall_{g}' for g in GROUPS] + [f'keep_recall_{g}_{lv}' for lv in LEVELS for g in GROUPS]
             + [f'keep_recall_{g}_{h}' for h in HALVES for g in ('far', 'near', 'large', 'small')]
             + list(TARGET_KEYS) + [f'{k}_{lv}' for lv in LEVELS for k in TARGET_KEYS]
             + [f'oracle_keep_recall_{g}_{lv}' for lv in LEVELS for g in GROUPS] + ['centroid_dy'])
RECORD_KEYS = (['cell', 'cass_normalization', 'cass_expansion_ratio', 'cass_loss_weight', 'seed', 'profile',
                'device', 'steps', 'commit', 'AP', 'AP50', 'AP_small', 'AP_medium', 'AP_large'] + BIAS_KEYS)
Normalization = Union[str, Tuple[str, ...]]


@dataclass(frozen=True)
class Cell:
    """One column of the grid. normalization: a mode or one mode per pruned level (P4, P5); weight: the
    CASS weight (times the seed's strength scale when `matched`); dset False: the plain detector."""
    normalization: Normalization = 'patch'
    ratio: float = 0.8
    weight: float = 0.05
    matched: bool = False
    dset: bool = True

    @property
    def name(self) -> str:
        if not self.dset:
            return 'plain_continue'
        if self.weight == 0:
            return 'cass_w0'
        if isinstance(self.normalization, tuple):
            mode = 'perlevel_' + '+'.join(SHORT[m] for m in self.normalization)
        else:
            mode = self.normalization
        name = f'{mode}_r{self.ratio}'
        if self.weight != 0.05:
            name = f'A_{name}_w{self.weight}' if mode == 'patch' else f'{name}_w{self.weight}'
        return name + ('_matched' if self.matched else '')

    @property
    def reference(self) -> 'Cell':
        """The cell whose initial CASS gradient a matched cell is scaled to: `patch` at the same r."""
        return Cell('patch', self.ratio, self.weight)


PLAIN = Cell(dset=False)
CASS_W0 = Cell('patch', 0.8, 0.0)
PERLEVEL = ('object_balanced', 'area_patch')     # P4, P5: the best P4 and P5 cells of the v1 grid
HEADLINE = (PLAIN, CASS_W0, Cell('patch', 0.8), Cell('patch', 0.3), Cell('object_balanced', 0.3, matched=True),
            Cell('area_patch', 0.3, matched=True), Cell(PERLEVEL, 0.3, matched=True))
AS_PROPOSED = (Cell('object_balanced', 0.3), Cell('area_patch', 0.3), Cell(PERLEVEL, 0.3))
REFERENCE = Cell('patch', 0.8)                   # the original CASS: paired differences are taken against it


@dataclass(frozen=True)
class Profile:
    """Sizes of one profile. A run's steps = epochs x iters (max_iters_per_epoch); one evaluation per epoch."""
    name: str
    num_train: int
    num_val: int
    image_wh: Sequence[int]          # generated image size (W, H); the input is the same size (no resize)
    batch: int
    stage1_epochs: int
    stage1_iters: int
    stage2_epochs: int               # headline cells: stage2_epochs evaluations, every stage2_iters steps
    stage2_iters: int
    extra_stage2_epochs: int         # extra (as proposed) cells
    pruning_warmup_epochs: int       # dset.token_pruning_warmup_epochs of stage 2 (0: prune from step 1)
    jobs: int                        # train.py processes at once
    device: str
    seeds: Sequence[int] = (0, 1, 2)
    extra_seeds: Sequence[int] = (0, 1)
    cells: Sequence[Cell] = HEADLINE
    extra_cells: Sequence[Cell] = AS_PROPOSED
    model_overrides: Dict = field(default_factory=dict)   # extra config (e.g. smaller model for smoke)
    lr: float = 2e-4
    threads: int = 0                 # torch threads per process (0: cores / jobs)
    loader_workers: int = 0          # dataloader worker processes per train.py
    strength_images: int = 32        # train images the strength scales are measured on


_TINY_MODEL = {
    'HybridEncoder': {'hidden_dim': 64, 'dim_feedforward': 128, 'nhead': 4},
    'RTDETRTransformerv2': {'feat_channels': [64, 64, 64], 'hidden_dim': 64, 'num_queries': 20,
                            'num_denoising': 10, 'dim_feedforward': 128, 'nhead': 4, 'num_layers': 2},
    'RTDETRPostProcessor': {'num_top_queries': 20},
}
# Measured on the quiet 2-core machine (2026-12-02): 512x288 batch 4 about 3.5 s a stage-1 step and 4.5 s a
# stage-2 step, an evaluation of 240 val images 40-60 s. cpu, per seed: stage 1 600 steps (~38 min), 7
# headline cells x 100 steps with evaluations at 0 / 50 / 100 (~70 min), on seeds 0 and 1 also 3 extra cells
# x 50 steps (~13 min): about 2 h a seed, 6 h for the grid. gpu: 8 processes, GPUs round-robin.
PROFILES = {
    'smoke': Profile('smoke', num_train=8, num_val=4, image_wh=(160, 96), batch=2, stage1_epochs=1,
                     stage1_iters=2, stage2_epochs=2, stage2_iters=1, extra_stage2_epochs=1,
                     pruning_warmup_epochs=0, jobs=1, device='cpu', seeds=(0,), extra_seeds=(0,),
                     cells=(PLAIN, CASS_W0, Cell('patch', 0.8), Cell(PERLEVEL, 0.3, matched=True)),
                     extra_cells=(Cell('patch', 0.3, 0.01),), model_overrides=_TINY_MODEL, threads=2,
                     strength_images=4),
    'cpu': Profile('cpu', num_train=3000, num_val=240, image_wh=(512, 288), batch=4, stage1_epochs=6,
                   stage1_iters=100, stage2_epochs=2, stage2_iters=50, extra_stage2_epochs=1,
                   pruning_warmup_epochs=0, jobs=1, device='cpu'),
    'gpu': Profile('gpu', num_train=6000, num_val=400, image_wh=(640, 352), batch=16, stage1_epochs=4,
                   stage1_iters=250, stage2_epochs=4, stage2_iters=50, extra_stage2_epochs=2,
                   pruning_warmup_epochs=0, jobs=8, device='cuda', lr=4e-4, loader_workers=2, seeds=(0, 1, 2),
                   extra_seeds=(0, 1, 2)),
}


def protocol_of(profile: Profile) -> dict:
    """What makes records comparable: the profile without seeds, jobs, threads and workers."""
    skip = {'seeds', 'extra_seeds', 'jobs', 'threads', 'loader_workers', 'device'}
    out = {k: v for k, v in asdict(profile).items() if k not in skip}
    out['cells'] = [c.name for c in profile.cells]
    out['extra_cells'] = [c.name for c in profile.extra_cells]
    return json.loads(json.dumps(out | {'version': PROTOCOL_VERSION}))


# ------------------------------------------------------------------------------------------------ data
def ensure_data(profile: Profile, data_dir: Path, log=print) -> Path:
    """Generate the profile's roadside set (seed 0, shared by all seeds) unless it is there."""
    w, h = profile.image_wh
    ensure_dataset(str(data_dir), num_train=profile.num_train, num_val=profile.num_val, width=w, height=h, seed=0,
                   workers=os.cpu_count() or 1, log=lambda message: log(f'[bias] {message}'), statistics=True)
    return data_dir


def run_config(profile: Profile, data_dir: Path, out_dir: Path, cell: Optional[Cell], epochs: int = 0,
               weight: Optional[float] = None) -> dict:
    """The config of a stage-1 run (cell None) or of a cell's stage-2 run, including the repository's
    configs. weight: the CASS weight to use (a matched cell's scaled weight); default the cell's."""
    hw = [profile.image_wh[1], profile.image_wh[0]]
    stage2 = cell is not None
    dset = stage2 and cell.dset
    settings = {
        'num_classes': 5,
        'output_dir': str(out_dir),
        'epochs': epochs or (profile.stage2_epochs if stage2 else profile.stage1_epochs),
        'max_iters_per_epoch': profile.stage2_iters if stage2 else profile.stage1_iters,
        'print_freq': 20,
        'input_size': list(hw),  # both Resize ops and eval_spatial_size
        'use_amp': False,  # the included COCO recipe turns AMP on; --amp (train.py --use-amp) decides here
        'HybridEncoder': {'use_encoder_idx': [1, 2]},
        'lr_warmup_scheduler': {'type': 'LinearWarmup', 'warmup_duration': 20},
        'lr_scheduler': {'type': 'MultiStepLR', 'milestones': [100000], 'gamma': 0.1},
        # from a random backbone (no download here): the backbone learns at the same lr as the rest
        'optimizer': {'lr': profile.lr, 'params': [
            {'name': 'backbone', 'params': '^(?=.*backbone)(?!.*(?:norm|bn|bias|moe\\.b[12]$)).*$', 'lr': profile.lr},
            {'name': 'backbone_norm_bias', 'params': '^(?=.*backbone)(?=.*(?:norm|bn|bias|moe\\.b[12]$)).*$',
             'lr': profile.lr, 'weight_decay': 0.0},
            {'name': 'norm_bias', 'params': '^(?!.*backbone)(?=.*(?:norm|bn|bias|moe\\.b[12]$)).*$',
             'weight_decay': 0.0}]},
        'train_dataloader': loader_config(data_dir, 'train', profile.batch, profile.loader_workers),
        'val_dataloader': loader_config(data_dir, 'val', max(profile.batch, 8), profile.loader_workers),
    }
    section = {}
    if dset:
        norm = list(cell.normalization) if isinstance(cell.normalization, tuple) else cell.normalization
        section = {'dset': {'keep_ratio': 0.3, 'token_pruning_warmup_epochs': profile.pruning_warmup_epochs,
                            'cass_normalization': norm, 'cass_expansion_ratio': cell.ratio,
                            'cass_loss_weight': float(cell.weight if weight is None else weight), 'vis_interval': 0}}
    base = 'dset4_r18_synth_cpu.yaml' if dset else 'rtdetrv2_r18vd_coco.yaml'
    return build_run_config(base, settings, profile.model_overrides, section)


# ------------------------------------------------------------------------------------------------ runs
def train_once(cfg: dict, run_dir: Path, seed: int, device: str, amp: bool, threads: int,
               tune_from: Optional[Path] = None, test_only: bool = False, log=print) -> dict:
    """Run train.py for one run unless `done.json` says it finished; returns done.json's content.

    test_only: one evaluation of the tuned weights (`-t tune_from --test-only`, eval/test.json)."""
    done = run_dir / 'done.json'
    if done.is_file():
        log(f'[bias] {run_dir.name}: done, skipped')
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, run_dir / 'config.yaml')
    cmd = [sys.executable, str(REPO / 'train.py'), '-c', str(run_dir / 'config.yaml'), '--seed', str(seed),
           '--device', device]
    if test_only:
        cmd += ['-t', str(tune_from), '--test-only']
    elif (run_dir / 'last.pth').is_file():
        cmd += ['-r', str(run_dir / 'last.pth')]
    else:
        cmd.append('--overwrite')  # a run that never wrote last.pth starts over (stale logs of a crash go)
        if tune_from is not None:
            cmd += ['-t', str(tune_from)]
    if amp:
        cmd.append('--use-amp')
    env = {**os.environ, 'PYTHONPATH': str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device.startswith('cuda:'):   # one GPU per job: the process sees only its own
        env['CUDA_VISIBLE_DEVICES'] = device.split(':', 1)[1]
        cmd[cmd.index('--device') + 1] = 'cuda'
    start = time.time()
    log(f'[bias] {run_dir.name}: ' + ' '.join(cmd[1:]))
    with open(run_dir / 'train.log', 'a') as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir / 'train.log').read_text()[-3000:]
        raise RuntimeError(f'{run_dir.name}: train.py exited with {proc.returncode}; log {run_dir}/train.log:\n{tail}')
    info = {'wall_s': round(time.time() - start, 1), 'epochs': 0 if test_only else cfg['epochs'],
            'steps': 0 if test_only else cfg['epochs'] * cfg['max_iters_per_epoch']}
    done.write_text(json.dumps(info))
    log(f'[bias] {run_dir.name}: finished in {info["wall_s"]:.0f} s')
    return info


def evaluations(run_dir: Path, iters_per_epoch: int) -> List[Tuple[int, dict]]:
    """[(steps, eval stats)] of every evaluation of a run, in order: eval/<epoch>.json at (epoch + 1) x
    iters steps; eval/test.json (a --test-only run) at step 0."""
    out = []
    for path in (run_dir / 'eval').glob('*.json'):
        if path.stem.isdigit():
            out.append(((int(path.stem) + 1) * iters_per_epoch, json.loads(path.read_text())))
        elif path.stem == 'test':
            out.append((0, json.loads(path.read_text())))
    return sorted(out, key=lambda x: x[0])


def stale_seeds(recorded: Dict[str, list], now: Dict[str, list]) -> List[int]:
    """Seeds whose stage 1, trained again now, has another learning curve than the one recorded with their runs
    (stage 1 is deterministic on one machine, not across CPUs or library builds; its weights are not kept)."""
    return sorted(int(s) for s, curve in now.items() if s in recorded and recorded[s] != curve)


def machine() -> str:
    """CPU model, core count and torch version: what float rounding (and so a run's digits) depends on."""
    import platform

    import torch
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    return f'{model}, {os.cpu_count()} cores, torch {torch.__version__}'


def learning_curve(run_dir: Path, iters_per_epoch: int) -> List[dict]:
    """[{'steps', 'AP', 'AP50'}] of every evaluation of a run."""
    return [{'steps': steps, 'AP': s['AP'], 'AP50': s['AP50']} for steps, s in evaluations(run_dir, iters_per_epoch)]


def eval_record(stats: dict, cell: Cell, seed: int, profile: Profile, device: str, steps: int, commit: str,
                weight: float) -> dict:
    """One record of bias_experiment.json from one evaluation's stats."""
    bias = stats.get('dset_bias') or {}
    norm = list(cell.normalization) if isinstance(cell.normalization, tuple) else cell.normalization
    record = {'cell': cell.name, 'cass_normalization': norm if cell.dset else None,
              'cass_expansion_ratio': cell.ratio if cell.dset else None,
              'cass_loss_weight': weight if cell.dset else None, 'seed': seed, 'profile': profile.name,
              'device': device, 'steps': steps, 'commit': commit}
    for key in ('AP', 'AP50', 'AP_small', 'AP_medium', 'AP_large'):
        record[key] = stats.get(key)
    for key in BIAS_KEYS:
        record[key] = bias.get(key)
    # an undefined AP (no box of that size in val) is NaN in the eval json: None here (valid JSON)
    record.update({k: None for k, v in record.items() if isinstance(v, float) and math.isnan(v)})
    record['num_boxes'] = {g: bias.get(f'num_boxes_{g}') for g in GROUPS}
    record['oracle_keep_recall'] = {g: bias.get(f'oracle_keep_recall_{g}') for g in GROUPS}
    return record


# ------------------------------------------------------------------------------------------------ strength
def measure_strength(profile: Profile, data_dir: Path, stage1_ckpt: Path, seed: int, cells: Sequence[Cell],
                     work: Path) -> Dict[str, dict]:
    """Per DSET cell: the gradient norm CASS sends to the pruner scores on stage-1 features, and its scale.

    The DSET model of the seed (seeded as train.py seeds it, stage-1 weights loaded as `-t` loads them) in
    eval mode runs the first `strength_images` train images (val transforms, no augmentation); every cell's
    CASS loss (weight 1) is evaluated on the same patch logits, its gradient norm on the logits averaged
    over the batches. scale = norm of the reference (`patch` at the same r) / norm of the cell; the weight
    a matched cell uses is its weight x scale. Returns {cell name: {'grad_norm', 'reference', 'scale'}} for
    the cells and their references.
    """
    import torch

    from src.core.config import YAMLConfig
    from src.data.coco_dataset import CocoDetection
    from src.data.transforms import Compose, ConvertPILImage, Resize
    from src.misc.rng import seed_everything
    from src.zoo.rtdetr import cass
    from src.zoo.rtdetr.weights import load_pretrained

    dset_cells = [c for c in cells if c.dset]
    needed = list(dict.fromkeys([*dset_cells, *(c.reference for c in dset_cells)]))
    cfg_dir = work / f'strength_seed{seed}'
    cfg_dir.mkdir(parents=True, exist_ok=True)
    settings = {}
    for cell in needed:
        path = cfg_dir / f'{cell.name}.yaml'
        write_run_config(run_config(profile, data_dir, cfg_dir, cell, weight=1.0), path)
        settings[cell] = YAMLConfig(str(path)).dset
    seed_everything(seed)
    first = YAMLConfig(str(cfg_dir / f'{needed[0].name}.yaml'))
    model = first.model
    load_pretrained(model, str(stage1_ckpt), trusted=False)
    model.eval()
    hw = first.yaml_cfg['eval_spatial_size']
    dataset = CocoDetection(img_folder=str(data_dir / 'images' / 'train'),
                            ann_file=str(data_dir / 'annotations' / 'instances_train.json'),
                            transforms=Compose([Resize(size=list(hw)), ConvertPILImage()]))
    norms: Dict[Cell, List[float]] = {c: [] for c in needed}
    n = min(profile.strength_images, len(dataset))
    for start in range(0, n, profile.batch):
        samples = [dataset[i] for i in range(start, min(n, start + profile.batch))]
        images = torch.stack([s[0] for s in samples])
        gt = [s[1]['boxes'].as_subclass(torch.Tensor).reshape(-1, 4).double() for s in samples]
        with torch.no_grad():
            infos = model(images)['dset_prune_info']
        logits = [info['patch_importance_scores'].double() for info in infos]
        shapes = [info['feat_shape'] for info in infos]
        for cell in needed:
            d = settings[cell]
            norm = cass.cass_score_gradient_norm(logits, gt, shapes, tuple(images.shape[-2:]), d.pruner.patch_size,
                                                 d.cass.level_configs(len(infos)))
            norms[cell].append(float(norm))
    mean = {c: statistics.mean(v) for c, v in norms.items()}
    return {c.name: {'grad_norm': mean[c], 'reference': c.reference.name,
                     'scale': strength_scale(mean[c.reference], mean[c])} for c in needed}


def strength_scale(reference_norm: float, cell_norm: float) -> float:
    """The factor that gives a cell the reference's initial gradient norm: reference / cell (1 if either is
    0: a cell without gradient cannot be matched, and a weight-0 cell stays at 0)."""
    if reference_norm <= 0 or cell_norm <= 0:
        return 1.0
    return reference_norm / cell_norm


# ------------------------------------------------------------------------------------------------ statistics
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> Optional[dict]:
    """Mean of the per-seed differences values - reference with a two-sided 95 % t interval.

    values and reference are paired by position (the same seed). Returns {'mean', 'low', 'high', 'n'}, or
    None without a pair; with one pair the interval is not defined (low = high = None)."""
    diffs = [a - b for a, b in zip(values, reference) if a is not None and b is not None]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {'mean': mean, 'low': None, 'high': None, 'n': 1}
    t = T_975.get(len(diffs) - 1, 1.96)
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {'mean': mean, 'low': mean - half, 'high': mean + half, 'n': len(diffs)}


def last_records(records: List[dict]) -> Dict[Tuple[str, int], dict]:
    """{(cell, seed): the record of the run's last evaluation}, for the runs that trained (a run's records
    are written when it finishes; a cell with only its step-0 record has not run yet and is left out)."""
    out: Dict[Tuple[str, int], dict] = {}
    for r in records:
        if r['steps'] == 0:
            continue
        key = (r['cell'], r['seed'])
        if key not in out or r['steps'] > out[key]['steps']:
            out[key] = r
    return out


def select_on_half(records: List[dict], candidates: Sequence[str], select_half: str = 'half0',
                   report_half: str = 'half1') -> Optional[dict]:
    """The candidate cell with the highest min(KR near, KR far) on `select_half` (mean over its seeds at
    the last step), and its figures on `report_half`, where it was not chosen."""
    last = last_records(records)
    scores = {}
    for name in candidates:
        rows = [r for (c, _), r in last.items() if c == name]
        vals = [min(r[f'keep_recall_near_{select_half}'], r[f'keep_recall_far_{select_half}']) for r in rows
                if r.get(f'keep_recall_near_{select_half}') is not None]
        if vals:
            scores[name] = statistics.mean(vals)
    if not scores:
        return None
    best = max(scores, key=scores.get)
    rows = [r for (c, _), r in last.items() if c == best]
    report = {g: statistics.mean(r[f'keep_recall_{g}_{report_half}'] for r in rows)
              for g in ('near', 'far', 'large', 'small')}
    return {'cell': best, 'criterion': f'min(KR near, KR far) on {select_half}', 'scores': scores,
            'reported_on': report_half, 'keep_recall': report, 'seeds': len(rows)}


# ------------------------------------------------------------------------------------------------ reports
def _mean_std(values: List[Optional[float]]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}'


TABLE_COLUMNS = (['AP', 'AP50', 'AP_small', 'AP_large'] + [f'keep_recall_{g}' for g in GROUPS]
                 + [f'keep_recall_{g}_{lv}' for lv in LEVELS for g in ('far', 'near')] + ['bottom_keep_ratio'])
DIFF_COLUMNS = ('AP', 'AP_large', 'keep_recall_near', 'keep_recall_far', 'keep_recall_large',
                'keep_recall_small', 'bottom_keep_ratio')


def _label(column: str) -> str:
    return column.replace('keep_recall_', 'KR ').replace('bottom_keep_ratio', 'bottom kept / target')


def markdown_table(records: List[dict], cells: Sequence[str]) -> str:
    """One row per cell at its last step: mean ± sample std over seeds of TABLE_COLUMNS."""
    last = last_records(records)
    head = '| cell | seeds | steps | ' + ' | '.join(_label(c) for c in TABLE_COLUMNS) + ' |'
    lines = [head, '|---|---:|---:|' + '---:|' * len(TABLE_COLUMNS)]
    for name in cells:
        rows = [r for (c, _), r in sorted(last.items()) if c == name]
        if rows:
            steps = '/'.join(sorted({str(r['steps']) for r in rows}))
            lines.append(f'| {name} | {len(rows)} | {steps} | '
                         + ' | '.join(_mean_std([r.get(c) for r in rows]) for c in TABLE_COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


def difference_table(records: List[dict], cells: Sequence[str], reference: str = REFERENCE.name) -> str:
    """Paired per-seed differences against `reference` at the cell's last step, the reference taken at the SAME
    step (a 50-step extra cell against the reference's 50-step evaluation): mean [95 % interval] (n seeds)."""
    last = last_records(records)
    ref_at = {(r['seed'], r['steps']): r for r in records if r['cell'] == reference}
    lines = ['| cell - ' + reference + ' | seeds | steps | ' + ' | '.join(_label(c) for c in DIFF_COLUMNS) + ' |',
             '|---|---:|---:|' + '---:|' * len(DIFF_COLUMNS)]
    for name in cells:
        if name == reference:
            continue
        rows = {s: r for (c, s), r in last.items() if c == name and (s, r['steps']) in ref_at}
        if not rows:
            continue
        ref = {s: ref_at[(s, r['steps'])] for s, r in rows.items()}
        cols = []
        for col in DIFF_COLUMNS:
            d = paired_difference([rows[s].get(col) for s in sorted(rows)], [ref[s].get(col) for s in sorted(rows)])
            if d is None:
                cols.append('-')
            elif d['low'] is None:
                cols.append(f"{d['mean']:+.3f}")
            else:
                mark = ' *' if d['low'] > 0 or d['high'] < 0 else ''
                cols.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{mark}")
        steps = '/'.join(str(x) for x in sorted({r['steps'] for r in rows.values()}))
        lines.append(f'| {name} | {len(rows)} | {steps} | ' + ' | '.join(cols) + ' |')
    return '\n'.join(lines) + '\n\n(* the 95 % interval excludes 0)\n'


def time_course_table(records: List[dict], cells: Sequence[str]) -> str:
    """KR near / far and AP against steps, mean over seeds."""
    steps = sorted({r['steps'] for r in records if r['cell'] in cells})
    lines = ['| cell | ' + ' | '.join(f'{s}' for s in steps) + ' |', '|---|' + '---:|' * len(steps)]
    for name in cells:
        cols = []
        for s in steps:
            rows = [r for r in records if r['cell'] == name and r['steps'] == s]
            if not rows:
                cols.append('')
                continue
            near = statistics.mean(r['keep_recall_near'] for r in rows) if rows[0].get('keep_recall_near') is not None else None
            far = statistics.mean(r['keep_recall_far'] for r in rows) if rows[0].get('keep_recall_far') is not None else None
            ap = statistics.mean(r['AP'] for r in rows)
            cols.append(f'AP {ap:.3f}' + ('' if near is None else f', near {near:.3f}, far {far:.3f}'))
        if any(cols):
            lines.append(f'| {name} | ' + ' | '.join(cols) + ' |')
    return '\n'.join(lines) + '\n'


def target_stats(records: List[dict]) -> Dict[str, dict]:
    """Per r and level: the target's bottom-half share, positive share against the keep budget, and the
    oracle keep-recall (top-K of the target), from the step-0 records (they depend on r and val only)."""
    out = {}
    for r in sorted(records, key=lambda r: r['steps']):
        ratio = r.get('cass_expansion_ratio')
        if ratio is None or f'r{ratio}' in out or r.get('target_bottom_share_P4') is None:
            continue
        out[f'r{ratio}'] = {lv: {'target_bottom_share': r[f'target_bottom_share_{lv}'],
                                 'target_positive_share': r[f'target_positive_share_{lv}'],
                                 'keep_fraction': r[f'keep_fraction_{lv}'],
                                 **{f'oracle_keep_recall_{g}': r[f'oracle_keep_recall_{g}_{lv}'] for g in GROUPS}}
                            for lv in LEVELS}
    return out


def plot_cells(records: List[dict], cells: Sequence[str], path: Path) -> None:
    """Bars per cell at the last step (mean over seeds, std as error bar): AP_large, KR near and far."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    last = last_records(records)
    keys = ('AP_large', 'keep_recall_near', 'keep_recall_far')
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cells) + 2), 4))
    for k, key in enumerate(keys):
        vals = [[r[key] for (c, _), r in last.items() if c == name and r.get(key) is not None] for name in cells]
        mean = [statistics.mean(v) if v else 0.0 for v in vals]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (k - 1) * 0.27, mean, 0.27, yerr=std, label=key, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(cells, rotation=35, ha='right', fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title('CASS bias experiment, last step (mean ± std over seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_course(records: List[dict], cells: Sequence[str], path: Path) -> None:
    """KR near (solid) and far (dashed) against steps, one colour per DSET cell, mean over seeds."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(cells):
        rows = [r for r in records if r['cell'] == name and r.get('keep_recall_near') is not None]
        steps = sorted({r['steps'] for r in rows})
        if not steps:
            continue
        colour = f'C{i % 10}'
        for key, style in (('keep_recall_near', '-'), ('keep_recall_far', '--')):
            ys = [statistics.mean(r[key] for r in rows if r['steps'] == s) for s in steps]
            ax.plot(steps, ys, style, color=colour, marker='o', ms=3,
                    label=name if key == 'keep_recall_near' else None)
    ax.set_xlabel('stage-2 steps')
    ax.set_ylabel('keep-recall (solid near, dashed far)')
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title('Time course (mean over seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mask_picture(run_dir: Path, data_dir: Path, path: Path, num_images: int = 4) -> None:
    """Kept patches (top-K of the pruner's logits, as in evaluation) of P4 and P5 on the first val images."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch

    from src.data.coco_dataset import CocoDetection
    from src.data.transforms import Compose, ConvertPILImage, Resize
    from src.zoo.rtdetr import cass
    from src.zoo.rtdetr.deploy import load_detector

    # EMA weights when present, loaded strictly, pruners past their warmup (as evaluation and export use them)
    cfg, model, _ = load_detector(str(run_dir / 'config.yaml'), checkpoint=str(run_dir / 'last.pth'))
    hw = cfg.yaml_cfg['eval_spatial_size']
    dataset = CocoDetection(img_folder=str(data_dir / 'images' / 'val'),
                            ann_file=str(data_dir / 'annotations' / 'instances_val.json'),
                            transforms=Compose([Resize(size=list(hw)), ConvertPILImage()]))
    samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images = torch.stack([s[0] for s in samples])
    with torch.no_grad():
        infos = model(images)['dset_prune_info']
    dset = cfg.dset
    fig, axes = plt.subplots(len(samples), len(infos), figsize=(4 * len(infos), 2.4 * len(samples)), squeeze=False)
    for j, info in enumerate(infos):
        logits = info['patch_importance_scores']
        k = cass.keep_count(logits.shape[1], dset.pruner.keep_ratio, dset.pruner.min_patches)
        kept = cass.top_k_mask(logits, k).reshape(-1, *info['patch_grid']).float()
        level = cass.level_name(info['feat_shape'], images.shape[-2:])
        for i, (image, _target) in enumerate(samples):
            ax = axes[i][j]
            shade = torch.nn.functional.interpolate(kept[i][None, None], size=image.shape[-2:], mode='nearest')[0, 0]
            ax.imshow((image.permute(1, 2, 0) * (0.3 + 0.7 * shade[..., None])).clamp(0, 1).numpy())
            ax.set_axis_off()
            ax.set_title(f'{level}: {k} of {logits.shape[1]} patches kept', fontsize=8)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def load_previous(out: Path, protocol: dict) -> dict:
    """The results json in `out` when it holds this protocol's records (to extend); {} when there is none.
    A json of another protocol is an error: its records are not comparable with this one's."""
    path = out / 'bias_experiment.json'
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get('protocol') != protocol:
        raise ValueError(f'{path} holds records of another protocol (version {old.get("protocol", {}).get("version", 1)}, '
                         f'this is version {PROTOCOL_VERSION} with profile {protocol.get("name")!r}); they cannot be '
                         f'merged. Pass another --out, or move the old file away to start over')
    return old


def plan(profile: Profile) -> List[Tuple[int, Cell, int]]:
    """(seed, cell, epochs) of every stage-2 run: the headline cells on `seeds`, the extras on `extra_seeds`."""
    jobs = [(s, c, profile.stage2_epochs) for s in profile.seeds for c in profile.cells]
    jobs += [(s, c, profile.extra_stage2_epochs) for s in profile.extra_seeds for c in profile.extra_cells
             if (s, c) not in {(j[0], j[1]) for j in jobs}]
    return jobs


def devices_for(device: str, jobs: int) -> List[str]:
    """One device per parallel job: CUDA GPUs round-robin ('cuda:0', 'cuda:1', ...), else `device`."""
    if device == 'cuda':
        import torch
        count = torch.cuda.device_count()
        if count > 1:
            return [f'cuda:{i % count}' for i in range(max(1, jobs))]
    return [device] * max(1, jobs)


def run(profile: Profile, out: Path, work: Path, device: str, amp: bool, log=print,
        full: Optional[Profile] = None) -> dict:
    """The experiment (or the part of it not yet in out/bias_experiment.json); returns the json.

    full: the whole profile when `profile` is restricted to some seeds (the json says what is missing)."""
    import threading
    from queue import Queue

    protocol = protocol_of(profile)
    previous = load_previous(out, protocol)
    records: List[dict] = list(previous.get('records', []))
    strength: Dict[str, dict] = dict(previous.get('strength', {}))
    curves: Dict[str, list] = dict(previous.get('stage1_learning_curve', {}))
    recorded_curves = dict(curves)   # the stage 1 each seed's recorded runs were tuned from
    machines = machines_of(previous)  # the machine of each seed (its stage 1 is trained on it)
    commit = git_commit(REPO)
    lock = threading.Lock()
    data_dir = ensure_data(profile, work / 'data', log)
    runs = work / 'runs'
    out.mkdir(parents=True, exist_ok=True)
    threads = profile.threads or max(1, (os.cpu_count() or 1) // max(1, profile.jobs))
    free = Queue()
    for d in devices_for(device, profile.jobs):
        free.put(d)

    def recorded(seed: int, cell: Cell, steps: int) -> bool:
        return any(r['cell'] == cell.name and r['seed'] == seed and r['steps'] == steps for r in records)

    todo = [(s, c, e) for s, c, e in plan(profile) if not recorded(s, c, e * profile.stage2_iters)]
    seeds = list(dict.fromkeys(s for s, _, _ in todo))

    def add(new: List[dict]):
        with lock:
            keys = {(r['cell'], r['seed'], r['steps']) for r in new}
            records[:] = [r for r in records if (r['cell'], r['seed'], r['steps']) not in keys] + new
            write_results(full or profile, out, device, amp, commit, records, strength, curves, log,
                          machines=machines)

    def _train(cfg, run_dir, seed, **kw):
        dev = free.get()
        try:
            return train_once(cfg, run_dir, seed, dev, amp, threads, log=log, **kw)
        finally:
            free.put(dev)

    def _stage1(seed):
        run_dir = runs / f'stage1_seed{seed}'
        _train(run_config(profile, data_dir, run_dir, None), run_dir, seed)
        with lock:
            curves[str(seed)] = learning_curve(run_dir, profile.stage1_iters)
            machines[str(seed)] = machine()
        return run_dir / 'last.pth'

    with ThreadPoolExecutor(max(1, profile.jobs)) as pool:
        stage1 = dict(zip(seeds, pool.map(_stage1, seeds)))
        for seed in stale_seeds(recorded_curves, curves):   # runs tuned from another stage 1 are not comparable
            n = sum(r['seed'] == seed for r in records)
            old, new = recorded_curves[str(seed)][-1], curves[str(seed)][-1]
            log(f'[bias] WARNING seed {seed}: the stage 1 trained now differs from the one its {n} recorded '
                f'record(s) were tuned from (AP at {new["steps"]} steps {new["AP"]:.4f}, recorded {old["AP"]:.4f}: '
                f'another machine or library build rounds floats differently); they are dropped and run again, '
                f'so that every run of a seed is tuned from the same weights')
            records[:] = [r for r in records if r['seed'] != seed]
            strength.pop(str(seed), None)
        todo = [(s, c, e) for s, c, e in plan(profile) if not recorded(s, c, e * profile.stage2_iters)]
        for seed in seeds:   # strength scales (in-process, cheap) and the step-0 evaluation
            if str(seed) not in strength:
                log(f'[bias] seed {seed}: measuring the CASS gradient strength of every cell on stage-1 features')
                strength[str(seed)] = measure_strength(profile, data_dir, stage1[seed], seed,
                                                       [c for s, c, _ in plan(profile) if s == seed], work)
        weights = {(s, c.name): c.weight * (strength[str(s)][c.name]['scale'] if c.matched else 1.0)
                   for s, c, _ in plan(profile) if c.dset}

        def _step0(job):
            seed, ratio = job   # the keep decisions do not depend on r, the target and oracle figures do
            run_dir = runs / f'dset_step0_r{ratio}_seed{seed}'
            _train(run_config(profile, data_dir, run_dir, Cell('patch', ratio)), run_dir, seed,
                   tune_from=stage1[seed], test_only=True)
            (_, stats), = evaluations(run_dir, profile.stage2_iters)
            new = [eval_record(stats, c, seed, profile, device, 0, commit, weights[(seed, c.name)])
                   | {'step0_shared': True} for s, c, _ in todo if s == seed and c.dset and c.ratio == ratio]
            if ratio == min(ratios):   # the plain control's step 0: stage 1's last evaluation
                plain_steps, plain_stats = evaluations(runs / f'stage1_seed{seed}', profile.stage1_iters)[-1]
                new += [eval_record(plain_stats, c, seed, profile, device, 0, commit, 0.0)
                        | {'stage1_steps': plain_steps} for s, c, _ in todo if s == seed and not c.dset]
            add(new)

        ratios = sorted({c.ratio for _, c, _ in todo if c.dset} or {REFERENCE.ratio})
        list(pool.map(_step0, [(s, r) for s in seeds for r in ratios]))

        def _stage2(job):
            seed, cell, epochs = job
            run_dir = runs / f'{cell.name}_seed{seed}'
            weight = weights.get((seed, cell.name), 0.0)
            _train(run_config(profile, data_dir, run_dir, cell, epochs=epochs, weight=weight if cell.dset else None),
                   run_dir, seed, tune_from=stage1[seed])
            add([eval_record(stats, cell, seed, profile, device, steps, commit, weight)
                 for steps, stats in evaluations(run_dir, profile.stage2_iters) if steps > 0])

        list(pool.map(_stage2, todo))
    result = write_results(full or profile, out, device, amp, commit, records, strength, curves, log,
                           machines=machines)
    (out / 'masks').mkdir(exist_ok=True)
    first = profile.seeds[0]
    for cell in profile.cells:
        run_dir = runs / f'{cell.name}_seed{first}'
        if cell.dset and (run_dir / 'last.pth').is_file():
            mask_picture(run_dir, data_dir, out / 'masks' / f'{cell.name}.png')
    log(f'[bias] wrote {out}/bias_experiment.{{json,md,png}}, bias_time_course.png and masks/')
    return result


def machines_of(previous: dict) -> Dict[str, str]:
    """{seed: machine} of a json: its ``machines``, or (written before 2026-12-03, one ``machine`` for the whole
    file) that machine for every seed recorded in it."""
    if 'machines' in previous:
        return dict(previous['machines'])
    seeds = sorted({str(r['seed']) for r in previous.get('records', [])} | set(previous.get('stage1_learning_curve', {})))
    return {s: previous.get('machine', 'not recorded (before 2026-12-02)') for s in seeds}


def write_results(profile: Profile, out: Path, device: str, amp: bool, commit: str, records: List[dict],
                  strength: dict, curves: dict, log=print, command: Optional[str] = None,
                  machines: Optional[Dict[str, str]] = None) -> dict:
    """bias_experiment.json / .md / .png and bias_time_course.png from the records so far. ``machines``: the
    machine each seed ran on (a seed's runs all come from one stage 1, so from one machine)."""
    cells = [c.name for c in profile.cells] + [c.name for c in profile.extra_cells if c not in profile.cells]
    records = sorted(records, key=lambda r: (cells.index(r['cell']) if r['cell'] in cells else 99, r['seed'],
                                             r['steps']))
    candidates = [c.name for c in (*profile.cells, *profile.extra_cells) if c.dset and c.weight > 0]
    planned = {(c.name, s) for s, c, _ in plan(profile)}
    finished = {(r['cell'], r['seed']) for r in records if r['steps'] > 0}
    machines = dict(sorted((machines or {}).items()))
    result = {'protocol': protocol_of(profile), 'device': device, 'machines': machines, 'amp': amp,
              'date': time.strftime('%Y-%m-%d'),
              'commit': commit, 'commits': sorted({r['commit'] for r in records}),
              'command': command or 'python tools/bias_experiment.py ' + ' '.join(sys.argv[1:]),
              'complete': planned <= finished,
              'missing_runs': sorted(f'{c}_seed{s}' for c, s in planned - finished),
              'stage1_learning_curve': curves, 'strength': strength, 'target_stats': target_stats(records),
              'selection': select_on_half(records, candidates), 'records': records}
    (out / 'bias_experiment.json').write_text(json.dumps(result, indent=1, default=float))
    state = ('complete' if result['complete'] else
             f"PARTIAL: {len(finished & planned)} of {len(planned)} runs, missing {', '.join(result['missing_runs'])}")
    sel = result['selection']
    chosen = ('' if sel is None else
              f"\n\nChosen on val half 0 by {sel['criterion']}: `{sel['cell']}`; on val half 1 (not used to "
              f"choose): " + ', '.join(f'KR {g} {v:.3f}' for g, v in sel['keep_recall'].items()) + '.\n')
    (out / 'bias_experiment.md').write_text(
        f"Profile `{profile.name}`, device {device}, commit(s) {', '.join(result['commits'])}; "
        f"`{result['command']}`; {result['date']}; {state}.\n\nMachines: "
        + '; '.join(f'seed {k}: {v}' for k, v in machines.items())
        + ".\n\n## Last step, mean ± std over seeds\n\n"
        + markdown_table(records, cells)
        + f"\n## Paired per-seed differences against {REFERENCE.name}, mean [95 % t interval]\n\n"
        + difference_table(records, cells) + "\n## Time course (mean over seeds)\n\n"
        + time_course_table(records, cells) + chosen)
    plot_cells(records, cells, out / 'bias_experiment.png')
    plot_time_course(records, [c for c in cells if c != PLAIN.name], out / 'bias_time_course.png')
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--profile', choices=sorted(PROFILES), required=True)
    p.add_argument('--out', default=None, help='results folder (default docs/results; smoke needs --out)')
    p.add_argument('--work', default=None, help='data and run folders (default output/bias_experiment/PROFILE)')
    p.add_argument('--device', default=None, help="default: the profile's (cpu, or cuda for gpu)")
    p.add_argument('--amp', action='store_true', help='pass --use-amp to train.py (autocast + GradScaler)')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help="run only these seeds of the profile (headline and extra cells); the json collects them")
    p.add_argument('--jobs', type=int, default=None, help="train.py processes at once (default: the profile's)")
    p.add_argument('--report-only', action='store_true',
                   help='run nothing: rewrite the table and plots of --out from its json (e.g. after a code change '
                        'of the report, or to look at a partial run)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seeds:
        unknown = sorted(set(args.seeds) - set(profile.seeds) - set(profile.extra_seeds))
        if unknown:
            print(f'bias_experiment: --seeds {unknown} are not seeds of the {profile.name} profile '
                  f'({sorted(set(profile.seeds) | set(profile.extra_seeds))})', file=sys.stderr)
            return 2
        profile = replace(profile, seeds=tuple(s for s in profile.seeds if s in args.seeds),
                          extra_seeds=tuple(s for s in profile.extra_seeds if s in args.seeds))
    if args.jobs:
        profile = replace(profile, jobs=args.jobs)
    if args.out is None and profile.name == 'smoke':
        print('bias_experiment: the smoke profile must not write to docs/results; pass --out DIR', file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO / 'docs' / 'results'
    work = Path(args.work) if args.work else REPO / 'output' / 'bias_experiment' / profile.name
    if args.report_only:
        try:
            prev = load_previous(out, protocol_of(profile))
        except ValueError as e:
            print(f'bias_experiment: {e}', file=sys.stderr)
            return 2
        if not prev:
            print(f'bias_experiment: --report-only: no {out}/bias_experiment.json', file=sys.stderr)
            return 2
        write_results(PROFILES[args.profile], out, prev['device'], prev['amp'], prev['commit'], prev['records'],
                      prev['strength'], prev['stage1_learning_curve'],
                      command=prev['command'].split(' (report')[0] + ' (report rewritten with --report-only)',
                      machines=machines_of(prev))
        return 0
    try:
        run(profile, out, work, args.device or profile.device, args.amp, full=replace(PROFILES[args.profile],
                                                                                     jobs=profile.jobs))
    except ValueError as e:
        print(f'bias_experiment: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
