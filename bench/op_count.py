"""Operators, GPU kernels and host syncs of one inference forward pass, per variant (where launch-bound time goes).

    python -m bench.op_count --device cuda --inputs 640x640 --official PATH/rtdetrv2_pytorch
    python -m bench.op_count --device cpu --inputs 192x320 -u dset.min_patches=1      # op counts on a CPU

At batch 1 on a GPU this detector is launch-bound (an H200 runs its 60-140 GFLOPs in far less time than it takes
to launch its kernels), so its latency follows the number of operators the host dispatches and the kernels it
launches, not the FLOPs. For each variant of ``bench/latency_bench.py`` (and ``official`` with ``--official``),
after two warm-up passes, one ``DeployModel`` forward (model + postprocessor, ``no_grad``) is profiled:

- ``aten_ops``: top-level aten operators the host dispatched (``torch.profiler`` CPU events named ``aten::``
  with no aten parent);
- ``kernels``: GPU kernels and memory operations launched (CUDA only);
- ``syncs``: host waits CUDA's checker reports (CUDA only; ``bench.sync_count.CudaSyncLog``), by line.

``--train-config CONFIG`` counts one training step of that config's trainer instead (``train_step``: forward,
criterion, backward, optimizer, EMA; the last of ``--steps``), with its most frequent operators. On CUDA the
optimizer is the multi-tensor (foreach) AdamW, on a CPU the per-parameter one, so a CPU count of a step is an
upper bound of what a GPU launches.

    python -m bench.op_count --device cpu --train-config configs/dset4_r18_synth_cpu.yaml \
        -u input_size=[128,128] dset.moe_dispatch=dense

Prints one markdown table; ``--out`` writes it with the command, machine and date as json.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from bench.latency_bench import ALL_VARIANTS, build, build_official, machine, parse_hw, portable_arg
from bench.sync_count import CudaSyncLog, run_train_steps


def top_level_aten_events(events) -> list:
    """aten operators called from Python (or the model's own code), not those called inside another aten op."""
    ops = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    return [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


def gpu_launches(events) -> int:
    """Kernels and memcpy / memset operations on the GPU."""
    return sum(1 for e in events if e.device_type.name == "CUDA")


def count_one(model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor, device: str) -> dict:
    """The counts of one forward pass of ``model`` (after two warm-up passes)."""
    with torch.no_grad():
        for _ in range(2):
            model(images, sizes)
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            model(images, sizes)
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
        row = {"aten_ops": len(top_level_aten_events(events))}
        if device == "cuda":
            row["kernels"] = gpu_launches(events)
            with CudaSyncLog() as log:
                model(images, sizes)
            row["syncs"] = sum(log.counts.values())
            row["sync_lines"] = {where: n for (_, where), n in sorted(log.counts.items())}
    return row


def train_step_ops(config: str, overrides: List[str], steps: int, device: str) -> Dict:
    """Operators of the last of ``steps`` training steps: {'aten_ops': N, 'kernels': N (CUDA), 'top': [(name,
    count), ...] the 12 most frequent}."""
    result: Dict = {}

    def profiled(real, trainer, *args, **kwargs):
        if trainer.state.step < steps - 1:
            return real(*args, **kwargs)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            out = real(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
        top = top_level_aten_events(events)
        result.update(aten_ops=len(top), top=collections.Counter(e.name for e in top).most_common(12))
        if device == "cuda":
            result["kernels"] = gpu_launches(events)
        return out

    run_train_steps(config, overrides, steps, device, profiled)
    if not result:
        raise ValueError(f"op_count: the first epoch of {config} has fewer than --steps {steps} batches; use "
                         f"fewer --steps or more training images")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--inputs", nargs="+", type=parse_hw, default=[(640, 640)], help="HxW sizes")
    p.add_argument("--variants", nargs="+", default=["plain_p5", "dset_k0.3_moe", "dset_k0.3_dense"],
                   help=f"subset of {' '.join(ALL_VARIANTS)}")
    p.add_argument("--official", default=None, metavar="PATH", help="an extracted rtdetrv2_pytorch (as latency_bench)")
    p.add_argument("-u", "--extra", nargs="+", default=[], help="extra config overrides for every variant")
    p.add_argument("--train-config", default=None, metavar="CONFIG",
                   help="count one training step of this config instead (-u: its overrides)")
    p.add_argument("--steps", type=int, default=3, help="--train-config: steps run, the last is counted")
    p.add_argument("--out", default=None, help="json path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("op_count: no CUDA device here (--device cpu counts the operators only)", file=sys.stderr)
        return 2
    if args.train_config:
        try:
            row = train_step_ops(args.train_config, args.extra, args.steps, args.device)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"one training step of {args.train_config}: {row['aten_ops']} aten ops"
              + (f", {row['kernels']} GPU kernels" if "kernels" in row else ""))
        for name, count in row["top"]:
            print(f"  {name} {count}")
        return 0
    rows: List[Dict] = []
    for hw in args.inputs:
        images = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(2)).to(args.device)
        sizes = torch.tensor([[hw[1], hw[0]]], device=args.device)
        models = {name: build(name, hw, args.device, args.extra) for name in args.variants}
        if args.official:
            models["official"] = build_official(args.official, hw, args.device, args.extra)
        for name, model in models.items():
            rows.append({"model": name, "input": f"{hw[0]}x{hw[1]}", **count_one(model, images, sizes, args.device)})
    cols = ["model", "input", "aten_ops"] + (["kernels", "syncs"] if args.device == "cuda" else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for r in rows:
        if r.get("sync_lines"):
            print(f"- {r['model']} {r['input']} syncs: {r['sync_lines']}")
    if args.out:
        command = "python -m bench.op_count " + " ".join(portable_arg(a) for a in (argv or sys.argv[1:]))
        Path(args.out).write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"),
                                              "machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
