"""Data-pipeline throughput: CocoDetection + RT-DETR train transforms + collate through a DataLoader.

    python bench/data_bench.py -c dataset/roadside_synth --workers 0 1 2

Reports images/second per worker count: over the whole pass (worker start-up included) and in
steady state (from the second batch on). Without -c it uses dataset/roadside_synth if present,
else generates a small synthetic set into a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

DEFAULT_DATASET = "dataset/roadside_synth"
HEAVY_OPS = ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]


def train_transform_spec(height: int, width: int, stop_epoch: int) -> dict:
    """The RT-DETR(v2) training pipeline as a Compose spec."""
    return {
        "type": "Compose",
        "ops": [
            {"type": "RandomPhotometricDistort", "p": 0.5},
            {"type": "RandomZoomOut", "fill": 0},
            {"type": "RandomIoUCrop", "p": 0.8},
            {"type": "SanitizeBoundingBoxes", "min_size": 1},
            {"type": "RandomHorizontalFlip"},
            {"type": "Resize", "size": [height, width]},
            {"type": "SanitizeBoundingBoxes", "min_size": 1},
            {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
        ],
        "policy": {"name": "stop_epoch", "epoch": stop_epoch, "ops": HEAVY_OPS},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--dataset", default=None,
                   help="dataset folder with images/<split>/ and annotations/instances_<split>.json")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    p.add_argument("--passes", type=int, default=2, help="passes over the split per worker count (best kept)")
    p.add_argument("--no-multiscale", action="store_true", help="disable the collate's multi-scale resize")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the main process (default: torch's choice)")
    return p.parse_args(argv)


def resolve_dataset(path, tmp_root: str) -> str:
    if path is not None:
        return path
    if os.path.isfile(os.path.join(DEFAULT_DATASET, "annotations", "instances_train.json")):
        return DEFAULT_DATASET
    from src.data.synthetic_roadside import generate_dataset

    out = os.path.join(tmp_root, "roadside_synth")
    print(f"{DEFAULT_DATASET} not found: generating 24 + 4 synthetic images into {out}")
    generate_dataset(out, num_train=24, num_val=4, seed=0)
    return out


def time_pass(loader) -> tuple:
    """(images, seconds for the whole pass, seconds from the second batch on, images after the first batch)."""
    start = time.perf_counter()
    first_done = None
    images = first_images = 0
    for batch_images, _targets in loader:
        images += batch_images.shape[0]
        if first_done is None:
            first_done = time.perf_counter()
            first_images = images
    end = time.perf_counter()
    return images, end - start, end - first_done, images - first_images


def main(argv=None) -> None:
    import torch
    from torch.utils.data import DataLoader

    from src.data.coco_dataset import CocoDetection
    from src.data.collate import BatchImageCollateFunction

    args = parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    h, w = args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = resolve_dataset(args.dataset, tmp)
        dataset = CocoDetection(os.path.join(root, "images", args.split),
                                os.path.join(root, "annotations", f"instances_{args.split}.json"),
                                transforms=train_transform_spec(h, w, stop_epoch=10 ** 6))
        scales = None if args.no_multiscale else [[s, s] for s in range(h - 160, h + 161, 32)]
        collate = BatchImageCollateFunction(scales=scales, stop_epoch=None)
        print(f"dataset {root} ({args.split}: {len(dataset)} images), batch {args.batch_size}, size {h}x{w}, "
              f"multiscale {'off' if scales is None else f'{scales[0][0]}-{scales[-1][0]}'}")
        print(f"python {platform.python_version()}, torch {torch.__version__}, cpus {os.cpu_count()}, "
              f"torch threads (main process) {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f} at start")
        print("| workers | images/s (whole pass) | images/s (steady, from batch 2) | pass seconds |")
        print("|---|---|---|---|")
        for workers in args.workers:
            best = None
            for p in range(args.passes):
                generator = torch.Generator().manual_seed(args.seed + p)
                loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                    collate_fn=collate, generator=generator, drop_last=False)
                torch.manual_seed(args.seed + p)
                images, total, steady, steady_images = time_pass(loader)
                result = (images / total, steady_images / steady if steady > 0 else float("nan"), total)
                best = result if best is None or result[0] > best[0] else best
            print(f"| {workers} | {best[0]:.1f} | {best[1]:.1f} | {best[2]:.2f} |")


if __name__ == "__main__":
    main()
