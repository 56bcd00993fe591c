"""One-command check of the CUDA code paths on a machine with a GPU (its timeouts add up to 480 s; no download).

    python -m bench.gpu_check                                  # on the GPU machine, from the repo root
    python -m bench.gpu_check --dry-run --out /tmp/gpu_dry     # the same plan, small, on CPU

Every step is a subprocess with a timeout (``TIMEOUTS_S``; a timeout kills the step's whole process tree, torchrun's
workers included), so one failure does not hide the others:

1. ``pytest -m cuda tests/test_cuda.py``: float16 / bfloat16 AMP steps with a forced overflow, CASS loss and
   deformable attention under autocast against float32, resume CUDA -> CPU -> CUDA, the postprocessor on CUDA;
2. the autocast probe: one forward pass of each AMP row's model under its config's autocast, whose
   ``pred_logits`` must come out in that dtype;
3. DSET (configs/dset4_r18_ratio0.3.yaml) at 1280x736 on synthetic images, float16 AMP (GradScaler), then
   bfloat16 AMP;
4. DDP, 2 ranks of configs/dset4_r18_synth_cpu.yaml at 512x288 (NCCL with 2 GPUs, gloo when both share one GPU:
   ``src.misc.dist.rank_placement``), then a second launch with ``-r`` of its last.pth for one more epoch.

Every DSET run prunes at keep 0.3 from its first step (the generated config sets
``dset.token_pruning_warmup_epochs: 0``), in training and evaluation; a row is ok only when the logged
``dset/keep_ratio`` and the evaluation's ``dset_keep_ratio`` say so, every loss is finite, the run did all its
steps, a float16 run's GradScaler has a finite scale and stepped at least once, and nothing else was skipped.
Throughput (images/s) is over the steps after warm-up: a run logs at iteration 0, at ``steps // 2`` and at its
last iteration (``print_freq``), so its last ``train/iter_time`` is the mean over the steps between the last two
logs, with no logging, pictures (``dset.vis_interval: 0``) or evaluation inside.

Each run folder is deleted before its run, so a second check in the same ``--out`` reads only its own files.
It prints one table and writes it to OUT/gpu_check.json and, unless ``--dry-run``, to docs/results/gpu_check.json.
``--dry-run`` runs the same plan on CPU: 160x96 images, 2 steps, gloo, float32 in the float16 row (float16
autocast on a CPU is emulated and far too slow), bfloat16 as planned, ``dset.min_patches: 1`` so that the tiny
feature maps are pruned too, 3x the timeouts (a shared CPU). Exit status 0 when every row is ok.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from src.core.run_config import run_config as build_run_config
from src.core.run_config import write_run_config
from src.data.synthetic_roadside import ensure_dataset, loader_config
from src.misc.dist import free_port, rank_placement
from src.misc.run_summary import read_log, read_scalars

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "docs" / "results" / "gpu_check.json"
KEEP_RATIO = 0.3
# seconds per step on the GPU machine (the whole check within 8 minutes of subprocesses); see Plan.timeout
TIMEOUTS_S = {"pytest_cuda": 100, "autocast_probe": 45, "dset_float16": 75, "dset_bfloat16": 75,
              "ddp_2ranks": 95, "ddp_resume": 90}
PYTEST_CUDA = ["-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]


@dataclass(frozen=True)
class Run:
    """One train.py launch of the check."""
    key: str                         # run folder, log file and TIMEOUTS_S entry
    base: str                        # the config under configs/ it includes
    data: str                        # "small" or "large" (Plan.sizes)
    amp_dtype: Optional[str]         # float16 | bfloat16; None: float32
    ranks: int = 1                   # > 1: launched by torchrun
    resume_of: Optional[str] = None  # key of the run whose last.pth this one resumes (one more epoch)


@dataclass(frozen=True)
class Plan:
    """What the check runs; ``make_plan(dry_run=True)`` is the same plan, small, on CPU."""
    dry_run: bool
    device: str
    steps: int                                  # iterations per epoch of every run
    sizes: Dict[str, Tuple[int, int]]           # data name -> input [h, w] (the synthetic images' size too)
    batch: Dict[str, int]                       # data name -> total batch size (the configs' own on a GPU)
    num_val: int
    num_gpus: int
    runs: Tuple[Run, ...]
    timeout_scale: float = 1.0                  # the dry run's CPU steps get 3x TIMEOUTS_S (a shared 2-core CPU)
    pytest: bool = True                         # step 1 (pytest -m cuda)

    def timeout(self, key: str) -> float:
        return TIMEOUTS_S[key] * self.timeout_scale

    @property
    def print_freq(self) -> int:
        """Logs at iteration 0, steps // 2 and the last one: the last ``train/iter_time`` covers only timed steps."""
        return max(1, self.steps // 2)

    @property
    def timed_steps(self) -> int:
        """The steps the last ``train/iter_time`` is the mean of (after the previous log)."""
        return self.steps - 1 - ((self.steps - 2) // self.print_freq) * self.print_freq

    def num_train(self, data: str) -> int:
        """Training images of a data set: enough for ``steps`` full batches (an epoch never ends early)."""
        return self.steps * self.batch[data]


def make_plan(dry_run: bool, steps: int = 20, num_gpus: int = 1) -> Plan:
    if dry_run:  # tiny images, batch 2, no GPU
        sizes, batch, steps, num_val, num_gpus = {"small": (96, 160), "large": (96, 160)}, {"small": 2, "large": 2}, \
            2, 2, 0
    else:  # the configs' own input sizes and batches
        sizes, batch, num_val = {"small": (288, 512), "large": (736, 1280)}, {"small": 4, "large": 8}, 8
    runs = (Run("dset_float16", "dset4_r18_ratio0.3.yaml", "large", None if dry_run else "float16"),
            Run("dset_bfloat16", "dset4_r18_ratio0.3.yaml", "large", "bfloat16"),
            Run("ddp_2ranks", "dset4_r18_synth_cpu.yaml", "small", None, ranks=2),
            Run("ddp_resume", "dset4_r18_synth_cpu.yaml", "small", None, ranks=2, resume_of="ddp_2ranks"))
    return Plan(dry_run, "cpu" if dry_run else "cuda", steps, sizes, batch, num_val, num_gpus, runs,
                timeout_scale=3.0 if dry_run else 1.0)


def select(plan: Plan, keys: Optional[Sequence[str]]) -> Plan:
    """``plan`` with only the steps ``keys`` (``--only``: pytest_cuda and / or run keys; None: all of them). A
    resume is refused without the run it resumes (its last.pth would be stale or missing)."""
    if not keys:
        return plan
    known = ["pytest_cuda"] + [r.key for r in plan.runs]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: unknown step; the steps are {', '.join(known)}")
    runs = tuple(r for r in plan.runs if r.key in keys)
    for r in runs:
        if r.resume_of and r.resume_of not in keys:
            raise ValueError(f"--only {r.key} resumes the run {r.resume_of}: add {r.resume_of} to --only")
    return dataclasses.replace(plan, runs=runs, pytest="pytest_cuda" in keys)


def title(plan: Plan, run: Run) -> str:
    h, w = plan.sizes[run.data]
    dtype = run.amp_dtype or ("float32 (float16's dry-run stand-in)" if run.key == "dset_float16" else "float32")
    what = f"{Path(run.base).stem} {w}x{h} {dtype}"
    if run.ranks > 1:
        what += f", DDP {run.ranks} ranks ({backend_of(plan, run)})"
    return what + (f", resume -r {run.resume_of}/last.pth +1 epoch" if run.resume_of else "")


def backend_of(plan: Plan, run: Run) -> Optional[str]:
    """The process-group backend train.py picks for the run's ranks (None for one process)."""
    return rank_placement(0, run.ranks, plan.num_gpus)[1] if run.ranks > 1 else None


# ------------------------------------------------------------------------------------------- data and configs
def data_dir(out: Path, plan: Plan, data: str) -> Path:
    """The synthetic roadside set of a data name, rendered (once per size and count) under ``out/data``."""
    h, w = plan.sizes[data]
    root = out / "data" / f"synth_{w}x{h}_{plan.num_train(data)}_{plan.num_val}"
    ensure_dataset(str(root), num_train=plan.num_train(data), num_val=plan.num_val, width=w, height=h, seed=0,
                   min_objects=6, max_objects=20, image_format="jpg", workers=max(1, (os.cpu_count() or 2) // 2),
                   log=print)
    return root


def run_config(plan: Plan, run: Run, data: Path, run_dir: Path) -> dict:
    """The run's config: ``configs/<base>`` with the synthetic set, the plan's size, batch and steps, DSET
    pruning at keep 0.3 without warmup (training and evaluation), no pictures, logging only at the plan's
    print_freq, and the run's AMP dtype."""
    batch, workers = plan.batch[run.data], 0 if plan.dry_run else 4
    dset = {"keep_ratio": KEEP_RATIO, "token_pruning_warmup_epochs": 0, "prune_in_eval": True, "vis_interval": 0}
    if plan.dry_run:
        dset["min_patches"] = 1  # the tiny P5 map has fewer patches than the configs' min_patches
    return build_run_config(run.base, {
        "num_classes": 5, "epochs": 2 if run.resume_of else 1, "print_freq": plan.print_freq,
        "max_iters_per_epoch": plan.steps, "checkpoint_freq": 0, "input_size": list(plan.sizes[run.data]),
        "output_dir": str(run_dir), "use_amp": run.amp_dtype is not None,
        **({"amp_dtype": run.amp_dtype} if run.amp_dtype else {}), "dset": dset,
        "train_dataloader": loader_config(data, "train", batch, workers),
        "val_dataloader": loader_config(data, "val", batch, workers)})


def fresh_run_dir(run_dir: Path) -> Path:
    """Delete what an earlier check left in ``run_dir`` (its TensorBoard files, log.jsonl, checkpoints), so the
    summary reads only this run's files, and train.py does not refuse the folder."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.exists():
        raise RuntimeError(f"gpu_check: cannot delete the old run folder {run_dir}; remove it by hand or use "
                           f"another --out")
    return run_dir


# ------------------------------------------------------------------------------------------- subprocesses
def _parent_and_state(pid: int) -> Optional[Tuple[int, str]]:
    """(parent pid, state letter) from /proc (Linux); None when the process is gone or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` in the process tree ([] without /proc)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        info = _parent_and_state(int(entry)) if entry.isdigit() else None
        if info:
            children.setdefault(info[0], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (ended, but not reaped yet by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    info = _parent_and_state(pid)
    return info is not None and info[1] != "Z"


def _wait_until_gone(proc: subprocess.Popen, pids: Sequence[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc.poll()  # reaps the launcher once it has ended
        if not any(is_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def kill_process_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a command launched with ``start_new_session=True`` and everything it started: SIGTERM to its process
    group, to the groups of all its descendants (torchrun starts each worker in a session of its own, so the
    launcher's group alone would leave the workers running) and to each of them, then SIGKILL to whatever still
    runs after ``grace_s``. The tree is listed before the first signal (orphans get another parent)."""
    pids = [proc.pid] + descendants(proc.pid)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never this script's own group
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for kill, target in [(os.killpg, g) for g in groups] + [(os.kill, p) for p in pids]:
            try:
                kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if _wait_until_gone(proc, pids, wait_s):
            break
    proc.wait()


def run(cmd: Sequence[str], log: Path, timeout: float) -> Tuple[int, float]:
    """Run ``cmd`` from the repo root, its output to ``log``; (exit status, seconds). A timeout kills the whole
    process tree and gives 124."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc)
            rc = 124
            f.write(f"\ngpu_check: timed out after {timeout} s; its process tree was killed\n")
    return rc, round(time.monotonic() - start, 1)


def train_command(plan: Plan, run: Run, config: Path, out: Path) -> List[str]:
    launch = [sys.executable]
    if run.ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(run.ranks), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port())]
    cmd = launch + [str(REPO / "train.py"), "-c", str(config), "--device", plan.device]
    if run.resume_of:
        cmd += ["-r", str(out / "runs" / run.resume_of / "last.pth")]
    return cmd


# ------------------------------------------------------------------------------------------- autocast probe
def autocast_output_dtypes(configs: Sequence[str], device: str) -> Dict[str, dict]:
    """Per config: the autocast dtype its training step uses (``amp_dtype_for``; float32 without AMP) and the
    dtype of ``pred_logits`` of one training-mode forward pass at its input size under that autocast."""
    import torch

    from src.core import YAMLConfig
    from src.solver.train_step import amp_dtype_for

    dev, out = torch.device(device), {}
    for path in configs:
        cfg = YAMLConfig(str(path))
        use_amp = bool(cfg.get("use_amp", False))
        dtype = amp_dtype_for(cfg, dev, use_amp) if use_amp else torch.float32
        model = cfg.model.to(dev).train()
        h, w = cfg["input_size"]
        images = torch.rand(2, 3, h, w, device=dev)
        boxes = torch.tensor([[0.3, 0.6, 0.1, 0.1], [0.7, 0.4, 0.2, 0.3]], device=dev)  # cx, cy, w, h
        targets = [{"labels": torch.tensor([0, 1], device=dev), "boxes": boxes} for _ in range(2)]
        with torch.autocast(dev.type, dtype=dtype, enabled=use_amp):
            logits = model(images, targets)["pred_logits"]
        out[Path(path).stem] = {"expected": str(dtype).replace("torch.", ""),
                                "pred_logits": str(logits.dtype).replace("torch.", "")}
        del model, logits
    return out


# ------------------------------------------------------------------------------------------- reading a run
def summarize_run(run_dir: Path, batch: int) -> dict:
    """What a finished run shows: images/s over the timed steps (the last ``train/iter_time``), peak memory,
    the keep ratios logged in training and applied in evaluation, the last AMP scale, the skipped steps and the
    steps and epoch of its last record, and whether every logged loss is finite."""
    scalars = read_scalars(str(run_dir / "tb"))
    records = read_log(str(run_dir)) if (run_dir / "log.jsonl").exists() else []
    last = records[-1] if records else {}
    iter_times = scalars.get("train/iter_time", [])
    losses = [v for tag, values in scalars.items() if tag.startswith("loss/") for _, v in values]
    scale = scalars.get("train/amp_scale", [])
    peak = [v for _, v in scalars.get("train/peak_memory_gib", [])]
    return {"images_per_s": round(batch / iter_times[-1][1], 2) if len(iter_times) >= 2 else None,
            "peak_memory_gib": round(max(peak), 2) if peak else None,
            "train_keep_ratio": sorted({round(v, 4) for _, v in scalars.get("dset/keep_ratio", [])}),
            "eval_keep_ratio": (last.get("eval") or {}).get("dset_keep_ratio"),
            "amp_scale": scale[-1][1] if scale else None,
            "skipped_steps": last.get("skipped_steps"),
            "steps": last.get("step"), "epoch": last.get("epoch"),
            "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses)}


def problems_of(plan: Plan, run: Run, row: dict) -> List[str]:
    """Why a run's row is not ok ([] when it is); every check needs its figure to be there."""
    epochs = 2 if run.resume_of else 1
    if row["steps"] is None:
        return ["log.jsonl has no record: the run finished no epoch"]
    out = []
    if row["steps"] != plan.steps * epochs or row["epoch"] != epochs - 1:
        out.append(f"log.jsonl ends at epoch {row['epoch']}, step {row['steps']}; expected epoch {epochs - 1}, "
                   f"step {plan.steps * epochs}")
    if not row["losses_finite"]:
        out.append("no loss logged, or a logged loss is not finite")
    if row["train_keep_ratio"] != [KEEP_RATIO]:
        out.append(f"training did not prune at keep {KEEP_RATIO}: dset/keep_ratio logged {row['train_keep_ratio']}")
    if row["eval_keep_ratio"] is None or abs(row["eval_keep_ratio"] - KEEP_RATIO) > 1e-6:
        out.append(f"evaluation did not prune at keep {KEEP_RATIO}: dset_keep_ratio {row['eval_keep_ratio']}")
    if row["images_per_s"] is None:
        out.append("no throughput: train/iter_time was logged fewer than twice")
    skipped = row["skipped_steps"] or {}
    if skipped.get("nonfinite", 1) != 0:
        out.append(f"non-finite steps skipped (or not recorded): {skipped}")
    if run.amp_dtype == "float16":
        scale = row["amp_scale"]
        if scale is None or not math.isfinite(scale):
            out.append(f"the GradScaler's train/amp_scale is {scale}, not a finite number")
        if skipped.get("amp_overflow", plan.steps * epochs) >= plan.steps * epochs:
            out.append(f"the GradScaler skipped every step ({skipped})")
    elif skipped.get("amp_overflow", 1) != 0:
        out.append(f"{run.amp_dtype or 'float32'} run with skipped overflow steps: {skipped}")
    if "autocast" in row:  # the rows the autocast probe ran for
        dtype = row["autocast"]
        if dtype is None:
            out.append("no autocast probe result (autocast_probe.log)")
        elif dtype["pred_logits"] != dtype["expected"]:
            out.append(f"autocast output dtype {dtype['pred_logits']}, expected {dtype['expected']}")
    return out


# ------------------------------------------------------------------------------------------- the check
COLUMNS = ["check", "ok", "seconds", "images_per_s", "peak_memory_gib", "train_keep_ratio", "eval_keep_ratio",
           "autocast", "amp_scale", "skipped_steps", "problems"]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "autocast" and isinstance(value, dict):
        return str(value.get("pred_logits"))
    if key == "problems":
        return "; ".join(value or [])
    return "" if value is None else str(value)


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def check(plan: Plan, out: Path) -> List[dict]:
    """Run the plan into ``out``; one row per step."""
    rows = []
    if plan.pytest:
        rc, secs = run([sys.executable, *PYTEST_CUDA], out / "pytest_cuda.log", plan.timeout("pytest_cuda"))
        # the dry run has no GPU: every test is skipped (0) or none is collected (5)
        ok = rc == 0 or (plan.dry_run and rc == 5)
        rows.append({"check": "pytest -m cuda tests/test_cuda.py", "ok": ok, "seconds": secs,
                     "problems": [] if ok else [f"exit status {rc} (pytest_cuda.log)"]})

    configs = {r.key: write_run_config(run_config(plan, r, data_dir(out, plan, r.data), out / "runs" / r.key),
                                      out / "runs" / f"{r.key}.yaml") for r in plan.runs}

    probed = [r for r in plan.runs if r.ranks == 1]
    probe_json = out / "autocast_probe.json"
    probe_json.unlink(missing_ok=True)
    probe_rc, _ = (1, 0.0) if not probed else run([sys.executable, "-m", "bench.gpu_check", "--device", plan.device, "--probe-out", probe_json,
                       "--autocast-probe", *[configs[r.key] for r in probed]], out / "autocast_probe.log",
                      plan.timeout("autocast_probe"))
    dtypes = json.loads(probe_json.read_text()) if probe_rc == 0 and probe_json.exists() else {}

    for r in plan.runs:
        run_dir = fresh_run_dir(out / "runs" / r.key)
        row = {"check": title(plan, r), "key": r.key, "backend": backend_of(plan, r)}
        resume_from = out / "runs" / str(r.resume_of) / "last.pth"
        if r.resume_of and not resume_from.exists():
            row.update(ok=False, seconds=0.0,
                       problems=[f"nothing to resume: {resume_from} is missing (its run failed)"])
            rows.append(row)
            continue
        rc, secs = run(train_command(plan, r, configs[r.key], out), out / f"{r.key}.log", plan.timeout(r.key))
        row.update(seconds=secs, **summarize_run(run_dir, plan.batch[r.data]))
        if r in probed:
            row["autocast"] = dtypes.get(configs[r.key].stem)  # None: the probe failed
        problems = ([f"exit status {rc} ({r.key}.log)"] if rc != 0 else []) + problems_of(plan, r, row)
        row.update(ok=not problems, problems=problems)
        rows.append(row)
    return rows


def result_paths(out: Path, dry_run: bool, only, result: Optional[str]) -> List[Path]:
    """Where the result json goes: OUT/gpu_check.json always; also ``--result``, else (not for a dry run or a
    partial ``--only`` check, which must not replace the full record) docs/results/gpu_check.json."""
    extra = result or (None if dry_run or only else str(RESULT))
    return [out / "gpu_check.json"] + ([Path(extra)] if extra and not dry_run else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="output/gpu_check", help="data, configs, run folders and logs")
    p.add_argument("--steps", type=int, default=20, help="iterations per run (>= 4; the first half is warm-up)")
    p.add_argument("--dry-run", action="store_true", help="the same plan on CPU: tiny inputs, 2 steps, gloo")
    p.add_argument("--result", default=None,
                   help=f"where the result json goes too (not in a dry run; default {RESULT.relative_to(REPO)}, "
                        f"except with --only: a partial check does not replace the full record unless given)")
    p.add_argument("--only", nargs="+", metavar="STEP",
                   help="run only these steps (pytest_cuda, dset_float16, dset_bfloat16, ddp_2ranks, ddp_resume; "
                        "default all): e.g. to measure one row again")
    p.add_argument("--autocast-probe", nargs="+", metavar="CONFIG", help=argparse.SUPPRESS)  # step 2, a subprocess
    p.add_argument("--probe-out", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.autocast_probe:
        Path(args.probe_out).write_text(json.dumps(autocast_output_dtypes(args.autocast_probe, args.device)))
        return 0
    if args.steps < 4 and not args.dry_run:
        p.error(f"--steps {args.steps}: use at least 4 (half of them are warm-up, the rest timed)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (--dry-run runs the same plan on CPU)", file=sys.stderr)
        return 2
    try:
        plan = select(make_plan(args.dry_run, args.steps, 0 if args.dry_run else torch.cuda.device_count()), args.only)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = check(plan, out)
    table = format_table(rows)
    print(table)
    result = {"device": "cpu (dry run)" if plan.dry_run else torch.cuda.get_device_name(0),
              "num_gpus": plan.num_gpus, "torch": torch.__version__, "dry_run": plan.dry_run,
              "date": time.strftime("%Y-%m-%d"), "steps": plan.steps, "timed_steps": plan.timed_steps,
              "seconds": round(time.monotonic() - start, 1), "only": args.only, "rows": rows, "table": table}
    paths = result_paths(out, plan.dry_run, args.only, args.result)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    print(f"written {', '.join(map(str, paths))} (logs: {out}/*.log)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
