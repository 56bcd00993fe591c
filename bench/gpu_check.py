"""One-command check of the CUDA code paths on a machine with one GPU (at most ~8 minutes, no download).

    python -m bench.gpu_check --out output/gpu_check          # on the GPU machine, from the repo root
    python -m bench.gpu_check --dry-run --out /tmp/gpu_dry    # CPU smoke of the script itself (tests/test_gpu_check.py)

Steps (each one a subprocess, so one failure does not hide the others):
1. renders the synthetic roadside sets (512x288 and 1280x736) under OUT/data;
2. ``pytest -m cuda tests/test_cuda.py``: float16 / bfloat16 AMP steps with a forced overflow, CASS loss and
   deformable attention under autocast against float32, resume CUDA -> CPU -> CUDA, the postprocessor on CUDA;
3. ``torchrun --nproc_per_node 1`` (nccl) of train.py, STEPS steps of configs/dset4_r18_synth_cpu.yaml with
   --use-amp;
4. STEPS float16 AMP steps of configs/dset4_r18_ratio0.3.yaml at 1280x736 on the synthetic images (the
   DAIR-V2X data is not on the machine: the data set is overridden in a generated config).
It prints one table (steps/s, peak memory, skipped steps, losses finite) and writes it to OUT/gpu_check.json.
``--dry-run`` runs the same logic on CPU with 160x96 images, 2 steps, gloo and float32 (float16 on a CPU is
emulated and far too slow at full width), in a few minutes on a 2-core machine.
Exit status 0 when every step passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from src.misc.dist import free_port

REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, width: int, height: int, num_train: int, num_val: int) -> Path:
    from src.data.synthetic_roadside import generate_dataset

    if not (root / "annotations" / "instances_val.json").exists():
        generate_dataset(str(root), num_train=num_train, num_val=num_val, width=width, height=height, seed=0,
                         min_objects=6, max_objects=20, image_format="jpg")
    return root


def run_config(base: str, data: Path, out_dir: Path, hw, steps: int, batch: int | None, dry_run: bool) -> Path:
    """A config including ``configs/<base>`` with the synthetic set, input ``hw`` = [h, w] and ``steps``
    iterations of one epoch (evaluated on the val split afterwards); ``batch`` None keeps the config's."""
    loader = lambda split, ops: {  # noqa: E731
        **({"total_batch_size": batch} if batch else {}), "num_workers": 0 if dry_run else 2,
        "dataset": {"img_folder": str(data / "images" / split),
                    "ann_file": str(data / "annotations" / f"instances_{split}.json"),
                    "transforms": {"ops": ops}}}
    train_ops = [{"type": "RandomPhotometricDistort", "p": 0.5}, {"type": "RandomHorizontalFlip"},
                 {"type": "Resize", "size": list(hw)}, {"type": "ConvertPILImage"}]
    cfg = {"__include__": [str(REPO / "configs" / base)], "num_classes": 5, "epochs": 1, "print_freq": 1,
           "max_iters_per_epoch": steps, "input_size": list(hw), "output_dir": str(out_dir),
           "train_dataloader": loader("train", train_ops),
           "val_dataloader": loader("val", [{"type": "Resize", "size": list(hw)}, {"type": "ConvertPILImage"}])}
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summarize_run(out_dir: Path) -> dict:
    """steps/s (median iteration time, first step excluded), peak memory, skipped steps, losses finite."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    times = sorted(e.value for e in acc.Scalars("train/iter_time"))[1:] if "train/iter_time" in tags else []
    losses = [e.value for t in tags if t.startswith("loss/") for e in acc.Scalars(t)]
    record = json.loads((out_dir / "log.jsonl").read_text().splitlines()[-1]) if (out_dir / "log.jsonl").exists() else {}
    peak = max((e.value for e in acc.Scalars("train/peak_memory_gib")), default=None) \
        if "train/peak_memory_gib" in tags else None
    return {"steps_per_s": round(1.0 / times[len(times) // 2], 3) if times else None,
            "peak_memory_gib": round(peak, 2) if peak is not None else None,
            "skipped_steps": record.get("skipped_steps"),
            "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses)}


def run(cmd, log: Path, timeout: float) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    log.write_text(" ".join(map(str, cmd)) + "\n" + (text if isinstance(text, str) else text.decode()))
    return rc, round(time.time() - start, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="output/gpu_check")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dry-run", action="store_true", help="CPU smoke of the script: tiny inputs, 2 steps, gloo")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run for the CPU smoke)", file=sys.stderr)
            return 2
    steps = 2 if dry else args.steps
    device = "cpu" if dry else "cuda"
    small_hw, large_hw = ([96, 160], [96, 160]) if dry else ([288, 512], [736, 1280])
    data_small = make_data(out / "data" / "synth_small", small_hw[1], small_hw[0], 8 if dry else 64, 2 if dry else 8)
    data_large = make_data(out / "data" / "synth_large", large_hw[1], large_hw[0], 8 if dry else 64, 2 if dry else 8)

    rows = []
    rc, secs = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
                   out / "pytest_cuda.log", timeout=240)
    rows.append({"check": "pytest -m cuda", "ok": rc in (0, 5) and (dry or rc == 0), "seconds": secs})

    # float16 on a CPU is emulated (minutes per step at full width): the dry run checks the script in float32;
    # the AMP code itself is exercised on CPU by tests/test_amp.py with a tiny model
    amp = [] if dry else ["--use-amp"]
    batch = 2 if dry else None  # the configs' own batch sizes on the GPU (4 and 8)
    specs = [("torchrun 1 GPU: dset4_r18_synth_cpu, AMP", "dset4_r18_synth_cpu.yaml", data_small, small_hw, batch, True),
             ("dset4_r18_ratio0.3 1280x736 synthetic, AMP", "dset4_r18_ratio0.3.yaml", data_large, large_hw, batch,
              False)]
    for name, base, data, hw, batch, torchrun in specs:
        run_dir = out / "runs" / Path(base).stem
        cfg = run_config(base, data, run_dir, hw, steps, batch, dry)
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                  "127.0.0.1", "--master_port", str(free_port())] if torchrun else [sys.executable]
        rc, secs = run(launch + [str(REPO / "train.py"), "-c", str(cfg), "--device", device, *amp],
                       out / f"{run_dir.name}.log", timeout=240 if not dry else 180)
        row = {"check": name, "ok": rc == 0, "seconds": secs}
        if (run_dir / "tb").exists():
            row.update(summarize_run(run_dir))
        row["ok"] = row["ok"] and row.get("losses_finite", False)
        rows.append(row)

    header = ["check", "ok", "seconds", "steps_per_s", "peak_memory_gib", "skipped_steps", "losses_finite"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(h, "")) for h in header) + " |")
    import torch

    result = {"device": torch.cuda.get_device_name(0) if not dry else "cpu (dry run)", "dry_run": dry,
              "date": time.strftime("%Y-%m-%d"), "steps": steps, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"written {out / 'gpu_check.json'} (logs: {out}/*.log)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
