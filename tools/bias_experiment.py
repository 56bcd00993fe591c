"""The CASS bias experiment on a trained detector, in one command (docs/cass_bias.md).

    python tools/bias_experiment.py --profile cpu                    # 2 seeds, this 2-core machine, resumable
    python tools/bias_experiment.py --profile gpu --amp              # 2 seeds on one GPU, runs in parallel
    python tools/bias_experiment.py --profile smoke --out /tmp/bias  # CPU, a few minutes, used by a test

Every training run is `train.py` in a subprocess, as a user runs it (no second training loop):
- stage 1, once per seed (or once, with seed `stage1_seed`, for every seed: the cpu profile, where a second
  stage 1 does not fit the budget): the plain RT-DETRv2-R18 (encoder on P4 and P5, no DSET) trained on the
  synthetic roadside set; its evaluations are the learning curve (AP50 against steps), recorded in the json;
- stage 2, per cell and seed: DSET (keep 0.3 on P4 and P5, MoE, CASS) tuned from stage 1 (`-t`) for
  `cass_normalization` in NORMALIZATIONS x `cass_expansion_ratio` in (0.8, 0.3), plus the seeds' scheme A
  (patch, weight 0.01, r 0.3). Every cell of a seed starts from the same weights with the same `--seed`
  (same new-parameter init and data order).
A run whose `done.json` exists is skipped; one with a `last.pth` but no `done.json` is resumed (`-r`).

Output in --out (default docs/results/ for the cpu / gpu profiles): bias_experiment.json (one record per
run), bias_experiment.md (mean +- std over seeds), bias_experiment.png (AP_large, keep-recall near / far
per cell), masks/<cell>.png (kept patches of P4 and P5 on the same four val images). Work files (data,
runs) go to --work (default output/bias_experiment/<profile>).
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
from typing import Dict, List, Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
NORMALIZATIONS = ('patch', 'object', 'object_area', 'area_patch', 'object_balanced')
RATIOS = (0.8, 0.3)
GROUPS = ('small', 'medium', 'large', 'far', 'near')
LEVELS = ('P4', 'P5')
RECORD_KEYS = (['cass_normalization', 'cass_expansion_ratio', 'cass_loss_weight', 'seed', 'profile', 'device',
                'steps', 'AP', 'AP50', 'AP_small', 'AP_medium', 'AP_large']
               + [f'keep_recall_{g}' for g in GROUPS]
               + [f'keep_recall_{g}_{lv}' for lv in LEVELS for g in GROUPS] + ['centroid_dy'])


@dataclass(frozen=True)
class Cell:
    """One column of the grid: a CASS normalisation, context ratio r and loss weight."""
    normalization: str
    ratio: float
    weight: float = 0.05

    @property
    def name(self) -> str:
        return 'A_patch_r0.3_w0.01' if self.is_scheme_a else f'{self.normalization}_r{self.ratio}'

    @property
    def is_scheme_a(self) -> bool:
        return self.normalization == 'patch' and self.ratio == 0.3 and self.weight == 0.01


GRID = tuple(Cell(n, r) for n in NORMALIZATIONS for r in RATIOS) + (Cell('patch', 0.3, 0.01),)


@dataclass(frozen=True)
class Profile:
    """Sizes of one profile. Steps = epochs x iters_per_epoch (max_iters_per_epoch caps each epoch)."""
    name: str
    num_train: int
    num_val: int
    image_wh: Sequence[int]          # generated image size (W, H); the input is the same size (no resize)
    batch: int
    stage1_epochs: int               # one evaluation per epoch: the learning curve
    stage1_iters: int
    stage2_epochs: int
    stage2_iters: int
    pruning_warmup_epochs: int       # dset.token_pruning_warmup_epochs of stage 2
    jobs: int                        # train.py processes at once
    device: str
    seeds: Sequence[int] = (0, 1)
    cells: Sequence[Cell] = GRID
    model_overrides: Dict = field(default_factory=dict)   # extra config (e.g. smaller model for smoke)
    lr: float = 2e-4
    threads: int = 0                 # torch threads per process (0: torch's default)
    loader_workers: int = 0          # dataloader worker processes per train.py
    stage1_seed: Optional[int] = None  # None: one stage 1 per seed; N: every seed tunes from stage 1 of seed N


_TINY_MODEL = {
    'HybridEncoder': {'hidden_dim': 64, 'dim_feedforward': 128, 'nhead': 4},
    'RTDETRTransformerv2': {'feat_channels': [64, 64, 64], 'hidden_dim': 64, 'num_queries': 20,
                            'num_denoising': 10, 'dim_feedforward': 128, 'nhead': 4, 'num_layers': 2},
    'RTDETRPostProcessor': {'num_top_queries': 20},
}
# Measured on the quiet 2-core machine (2026-12-02): the stage-1 detector (encoder on P4 and P5) at 512x288
# batch 4 takes about 4 s a step. cpu: 600 stage-1 steps (~45 min with evaluations) + per seed 11 cells x 40
# steps (~40 min); a stage 1 per seed would make 2 seeds 3.3 h, so both seeds tune from stage 1 of seed 0
# (as every user tunes from the one COCO checkpoint): about 2.1 h. gpu: 8 processes on one GPU, a stage 1
# per seed.
PROFILES = {
    'smoke': Profile('smoke', num_train=8, num_val=4, image_wh=(160, 96), batch=2, stage1_epochs=1,
                     stage1_iters=2, stage2_epochs=1, stage2_iters=2, pruning_warmup_epochs=0, jobs=1,
                     device='cpu', seeds=(0,), cells=(Cell('patch', 0.8), Cell('object_balanced', 0.3),
                                                       Cell('patch', 0.3, 0.01)),
                     model_overrides=_TINY_MODEL, threads=2),
    'cpu': Profile('cpu', num_train=3000, num_val=240, image_wh=(512, 288), batch=4, stage1_epochs=6,
                   stage1_iters=100, stage2_epochs=1, stage2_iters=40, pruning_warmup_epochs=0, jobs=1,
                   device='cpu', stage1_seed=0),
    'gpu': Profile('gpu', num_train=6000, num_val=400, image_wh=(640, 352), batch=16, stage1_epochs=8,
                   stage1_iters=250, stage2_epochs=3, stage2_iters=100, pruning_warmup_epochs=1, jobs=8,
                   device='cuda', lr=4e-4, loader_workers=2),
}


# ------------------------------------------------------------------------------------------------ data
def ensure_data(profile: Profile, data_dir: Path, log=print) -> Path:
    """Generate the profile's roadside set (seed 0, shared by all seeds) unless it is there."""
    if (data_dir / 'annotations' / 'instances_val.json').is_file():
        return data_dir
    from src.data.synthetic_roadside import compute_split_statistics, format_statistics, generate_dataset

    w, h = profile.image_wh
    log(f'[bias] generating {profile.num_train} train / {profile.num_val} val images ({w}x{h}) in {data_dir}')
    splits = generate_dataset(str(data_dir), num_train=profile.num_train, num_val=profile.num_val, width=w,
                              height=h, seed=0, workers=os.cpu_count() or 1)
    for split, coco in splits.items():
        log(format_statistics(split, compute_split_statistics(coco)))
    return data_dir


def _loader(data_dir: Path, split: str, batch: int, workers: int) -> dict:
    ops = [{'type': 'Resize'}, {'type': 'ConvertPILImage'}]  # size: the config's input_size
    if split == 'train':
        ops = [{'type': 'RandomPhotometricDistort', 'p': 0.5}, {'type': 'RandomHorizontalFlip'}] + ops
    return {'total_batch_size': batch, 'num_workers': workers,
            'dataset': {'img_folder': str(data_dir / 'images' / split),
                        'ann_file': str(data_dir / 'annotations' / f'instances_{split}.json'),
                        'transforms': {'type': 'Compose', 'policy': None, 'ops': ops}},
            'collate_fn': {'type': 'BatchImageCollateFunction', 'scales': None, 'stop_epoch': None}}


def run_config(profile: Profile, data_dir: Path, out_dir: Path, cell: Optional[Cell]) -> dict:
    """The config of a stage-1 (cell None) or stage-2 run, including the repository's real configs."""
    hw = [profile.image_wh[1], profile.image_wh[0]]
    stage2 = cell is not None
    cfg = {
        '__include__': [str(REPO / 'configs' / ('dset4_r18_synth_cpu.yaml' if stage2 else 'rtdetrv2_r18vd_coco.yaml'))],
        'num_classes': 5,
        'output_dir': str(out_dir),
        'epochs': profile.stage2_epochs if stage2 else profile.stage1_epochs,
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
        'train_dataloader': _loader(data_dir, 'train', profile.batch, profile.loader_workers),
        'val_dataloader': _loader(data_dir, 'val', max(profile.batch, 8), profile.loader_workers),
    }
    for key, value in profile.model_overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    if stage2:
        cfg['dset'] = {'keep_ratio': 0.3, 'token_pruning_warmup_epochs': profile.pruning_warmup_epochs,
                       'cass_normalization': cell.normalization, 'cass_expansion_ratio': cell.ratio,
                       'cass_loss_weight': cell.weight, 'vis_interval': 0}
    return cfg


# ------------------------------------------------------------------------------------------------ runs
def train_once(cfg: dict, run_dir: Path, seed: int, device: str, amp: bool, threads: int,
               tune_from: Optional[Path] = None, log=print) -> dict:
    """Run train.py for one run unless `done.json` says it finished; returns done.json's content."""
    done = run_dir / 'done.json'
    if done.is_file():
        log(f'[bias] {run_dir.name}: done, skipped')
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, str(REPO / 'train.py'), '-c', str(run_dir / 'config.yaml'), '--seed', str(seed),
           '--device', device]
    if (run_dir / 'last.pth').is_file():
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
    start = time.time()
    log(f'[bias] {run_dir.name}: ' + ' '.join(cmd[1:]))
    with open(run_dir / 'train.log', 'a') as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir / 'train.log').read_text()[-3000:]
        raise RuntimeError(f'{run_dir.name}: train.py exited with {proc.returncode}; log {run_dir}/train.log:\n{tail}')
    info = {'wall_s': round(time.time() - start, 1), 'epochs': cfg['epochs'],
            'steps': cfg['epochs'] * cfg['max_iters_per_epoch']}
    done.write_text(json.dumps(info))
    log(f'[bias] {run_dir.name}: finished in {info["wall_s"]:.0f} s')
    return info


def learning_curve(run_dir: Path, iters_per_epoch: int) -> List[dict]:
    """[{'steps', 'AP', 'AP50'}] of every evaluation of a run (eval/<epoch>.json)."""
    curve = []
    for path in sorted((run_dir / 'eval').glob('*.json'), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        if not path.stem.isdigit():
            continue
        stats = json.loads(path.read_text())
        curve.append({'steps': (int(path.stem) + 1) * iters_per_epoch, 'AP': stats['AP'], 'AP50': stats['AP50']})
    return curve


def run_record(run_dir: Path, cell: Cell, seed: int, profile: Profile, device: str, steps: int) -> dict:
    """One record of bias_experiment.json from the run's last evaluation."""
    evals = [p for p in (run_dir / 'eval').glob('*.json') if p.stem.isdigit()]
    if not evals:
        raise RuntimeError(f'{run_dir}: no eval/<epoch>.json; the run did not evaluate')
    stats = json.loads(max(evals, key=lambda p: int(p.stem)).read_text())
    bias = stats.get('dset_bias') or {}
    record = {'cass_normalization': cell.normalization, 'cass_expansion_ratio': cell.ratio,
              'cass_loss_weight': cell.weight, 'seed': seed, 'profile': profile.name, 'device': device,
              'steps': steps, 'cell': cell.name}
    for key in ('AP', 'AP50', 'AP_small', 'AP_medium', 'AP_large'):
        record[key] = stats.get(key)
    for key in RECORD_KEYS[12:]:
        record[key] = bias.get(key)
    # an undefined AP (no box of that size in val) is NaN in the eval json: None here (valid JSON)
    record.update({k: None for k, v in record.items() if isinstance(v, float) and math.isnan(v)})
    record['num_boxes'] = {g: bias.get(f'num_boxes_{g}') for g in GROUPS}
    record['oracle_keep_recall'] = {g: bias.get(f'oracle_keep_recall_{g}') for g in GROUPS}
    return record


# ------------------------------------------------------------------------------------------------ reports
def _mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}'


TABLE_COLUMNS = (['AP', 'AP50', 'AP_small', 'AP_large'] + [f'keep_recall_{g}' for g in GROUPS]
                 + [f'keep_recall_{g}_{lv}' for lv in LEVELS for g in ('far', 'near')] + ['centroid_dy'])


def markdown_table(records: List[dict], cells: Sequence[Cell]) -> str:
    """One row per cell, mean ± sample std over seeds of TABLE_COLUMNS."""
    head = '| cell | seeds | ' + ' | '.join(c.replace('keep_recall_', 'KR ') for c in TABLE_COLUMNS) + ' |'
    lines = [head, '|---|---:|' + '---:|' * len(TABLE_COLUMNS)]
    for cell in cells:
        rows = [r for r in records if r['cell'] == cell.name]
        lines.append(f'| {cell.name} | {len(rows)} | '
                     + ' | '.join(_mean_std([r[c] for r in rows]) for c in TABLE_COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


def plot_cells(records: List[dict], cells: Sequence[Cell], path: Path) -> None:
    """Bars per cell (mean over seeds, std as error bar): AP_large, keep-recall near and far."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ('AP_large', 'keep_recall_near', 'keep_recall_far')
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cells) + 2), 4))
    for k, key in enumerate(keys):
        vals = [[r[key] for r in records if r['cell'] == c.name and r[key] is not None] for c in cells]
        mean = [statistics.mean(v) if v else 0.0 for v in vals]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (k - 1) * 0.27, mean, 0.27, yerr=std, label=key, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels([c.name for c in cells], rotation=35, ha='right', fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title('CASS bias experiment (mean ± std over seeds)')
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
        k = cass.keep_count(logits.shape[1], dset['keep_ratio'], dset['min_patches'])
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
def stage1_seed_of(profile: Profile, seed: int) -> int:
    """The seed of the stage-1 run whose weights the stage-2 cells of `seed` start from."""
    return seed if profile.stage1_seed is None else profile.stage1_seed


def stage1_seeds(profile: Profile) -> List[int]:
    """The stage-1 runs a profile needs, in order."""
    return list(dict.fromkeys(stage1_seed_of(profile, s) for s in profile.seeds))


def run(profile: Profile, out: Path, work: Path, device: str, amp: bool, log=print) -> dict:
    """The whole experiment; returns the json written to out/bias_experiment.json."""
    data_dir = ensure_data(profile, work / 'data', log)
    runs = work / 'runs'
    stage1 = {}

    def _stage1(seed):
        run_dir = runs / f'stage1_seed{seed}'
        info = train_once(run_config(profile, data_dir, run_dir, None), run_dir, seed, device, amp,
                          profile.threads, log=log)
        return seed, run_dir, info

    def _stage2(job):
        seed, cell = job
        run_dir = runs / f'{cell.name}_seed{seed}'
        info = train_once(run_config(profile, data_dir, run_dir, cell), run_dir, seed, device, amp,
                          profile.threads, tune_from=stage1[stage1_seed_of(profile, seed)] / 'last.pth', log=log)
        return seed, cell, run_dir, info

    with ThreadPoolExecutor(max(1, profile.jobs)) as pool:
        for seed, run_dir, _ in pool.map(_stage1, stage1_seeds(profile)):
            stage1[seed] = run_dir
        jobs = [(seed, cell) for seed in profile.seeds for cell in profile.cells]
        finished = list(pool.map(_stage2, jobs))
    records = [run_record(run_dir, cell, seed, profile, device, info['steps'])
               | {'stage1_seed': stage1_seed_of(profile, seed)}
               for seed, cell, run_dir, info in finished]
    curves = {str(seed): learning_curve(run_dir, profile.stage1_iters) for seed, run_dir in stage1.items()}
    result = {'profile': asdict(profile) | {'cells': [asdict(c) for c in profile.cells]},
              'device': device, 'amp': amp, 'date': time.strftime('%Y-%m-%d'),
              'command': 'python tools/bias_experiment.py ' + ' '.join(sys.argv[1:]),
              'stage1_learning_curve': curves,
              'stage1_reached_AP50_0.5': {s: any(p['AP50'] >= 0.5 for p in c) for s, c in curves.items()},
              'records': records}
    out.mkdir(parents=True, exist_ok=True)
    (out / 'bias_experiment.json').write_text(json.dumps(result, indent=1, default=float))
    shared = ('' if profile.stage1_seed is None
              else f' (stage 2 of every seed tuned from stage 1 of seed {profile.stage1_seed})')
    (out / 'bias_experiment.md').write_text(
        f"Profile `{profile.name}`, device {device}, {len(profile.seeds)} seed(s){shared}; "
        f"`{result['command']}`; {result['date']}.\n\n" + markdown_table(records, profile.cells))
    plot_cells(records, profile.cells, out / 'bias_experiment.png')
    (out / 'masks').mkdir(exist_ok=True)
    for cell in profile.cells:
        mask_picture(runs / f'{cell.name}_seed{profile.seeds[0]}', data_dir, out / 'masks' / f'{cell.name}.png')
    log(f'[bias] wrote {out}/bias_experiment.{{json,md,png}} and {out}/masks/')
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--profile', choices=sorted(PROFILES), required=True)
    p.add_argument('--out', default=None, help='results folder (default docs/results; smoke needs --out)')
    p.add_argument('--work', default=None, help='data and run folders (default output/bias_experiment/PROFILE)')
    p.add_argument('--device', default=None, help="default: the profile's (cpu, or cuda for gpu)")
    p.add_argument('--amp', action='store_true', help='pass --use-amp to train.py (float16 autocast + GradScaler)')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help="override the profile's seeds")
    p.add_argument('--jobs', type=int, default=None, help="train.py processes at once (default: the profile's)")
    p.add_argument('--stage1-per-seed', action='store_true',
                   help='one stage 1 per seed even where the profile shares the stage 1 of one seed (cpu)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = replace(profile, seeds=tuple(args.seeds))
    if args.jobs:
        profile = replace(profile, jobs=args.jobs)
    if args.stage1_per_seed:
        profile = replace(profile, stage1_seed=None)
    if args.out is None and profile.name == 'smoke':
        print('bias_experiment: the smoke profile must not write to docs/results; pass --out DIR', file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO / 'docs' / 'results'
    work = Path(args.work) if args.work else REPO / 'output' / 'bias_experiment' / profile.name
    run(profile, out, work, args.device or profile.device, args.amp)
    return 0


if __name__ == '__main__':
    sys.exit(main())
