"""Data-pipeline benchmarks: loader throughput, and the start-up cost of a large json (``--scale``).

    python -m bench.data_bench -c dataset/roadside_synth --workers 0 1 2
    python -m bench.data_bench --scale                    # 200k images, about 2M annotations
    python -m bench.data_bench --scale --images 5000      # a quick run

Throughput: images/second per worker count, over the whole pass (worker start-up included) and in
steady state (from the second batch on). Without -c it uses dataset/roadside_synth if present,
else generates a small synthetic set into a temporary folder.

Scale: generates a COCO json of --images images (1920x1080, 0-20 boxes each, 1% crowd) and, for the header
check, one hard link per image to a few small JPEG files, in --workdir (kept and reused). Each step runs in its
own process and reports its seconds and its peak RSS above the process's RSS before the step: json.load (as
is, and with the garbage collector paused as the dataset does), pycocotools COCO(), CocoDetection without and
with the header check (cold cache, then cached), and the evaluator (from the dataset's parse, and from a
second read of the json as before). It prints the ratios to json.load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
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
    p.add_argument("--scale", action="store_true", help="the large-json start-up benchmark instead of throughput")
    p.add_argument("--images", type=int, default=200_000, help="--scale: images in the generated json")
    p.add_argument("--boxes-per-image", type=int, default=10, help="--scale: mean boxes per image")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dset_data_bench"),
                   help="--scale: where the json and the image links are generated (reused when present)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)   # one step, in a child process
    return p.parse_args(argv)


def resolve_dataset(path, tmp_root: str) -> str:
    if path is not None:
        return path
    if os.path.isfile(os.path.join(DEFAULT_DATASET, "annotations", "instances_train.json")):
        return DEFAULT_DATASET
    from src.data.synthetic_roadside import ensure_dataset

    out = os.path.join(tmp_root, "roadside_synth")
    ensure_dataset(out, num_train=24, num_val=4, seed=0, log=lambda message: print(f"{DEFAULT_DATASET} not found: "
                                                                                   f"{message}"))
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
    if args.phase is not None:
        print(json.dumps(run_phase(args.phase, args)))
        return
    if args.scale:
        scale_main(args)
        return
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


# ----------------------------------------------------------------------------- --scale
SCALE_SIZE = (1920, 1080)
LINKS_PER_FILE = 50_000   # ext4 allows 65000 hard links to a file


def write_large_coco_json(path: str, num_images: int, boxes_per_image: int = 10, seed: int = 0) -> int:
    """A COCO json of `num_images` 1920x1080 images with 0..2*boxes_per_image boxes each (8 classes, 1% crowd),
    values drawn with numpy and written in chunks; returns the number of annotations."""
    import numpy as np

    width, height = SCALE_SIZE
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 2 * boxes_per_image + 1, num_images)
    n = int(counts.sum())
    image_of = np.repeat(np.arange(1, num_images + 1), counts)
    w, h = rng.uniform(4, 300, n).round(2), rng.uniform(4, 200, n).round(2)
    x, y = (rng.uniform(0, 1, n) * (width - w)).round(2), (rng.uniform(0, 1, n) * (height - h)).round(2)
    columns = (image_of, rng.integers(1, 9, n), x, y, w, h, (w * h).round(2), (rng.uniform(0, 1, n) < 0.01).astype(int))
    with open(path + ".tmp", "w") as f:
        f.write('{"info": {"description": "bench/data_bench.py --scale"}, "images": [')
        f.write(", ".join(f'{{"id": {i}, "file_name": "{i:07d}.jpg", "width": {width}, "height": {height}}}'
                          for i in range(1, num_images + 1)))
        f.write('], "categories": [' + ", ".join(f'{{"id": {c}, "name": "class{c}", "supercategory": "road"}}'
                                                 for c in range(1, 9)))
        f.write('], "annotations": [')
        step = 200_000
        for start in range(0, n, step):
            rows = zip(*(c[start:start + step].tolist() for c in columns))
            f.write((", " if start else "") + ", ".join(
                f'{{"id": {start + k + 1}, "image_id": {im}, "category_id": {c}, "segmentation": [], '
                f'"bbox": [{bx}, {by}, {bw}, {bh}], "area": {a}, "iscrowd": {z}}}'
                for k, (im, c, bx, by, bw, bh, a, z) in enumerate(rows)))
        f.write("]}")
    os.replace(path + ".tmp", path)
    return n


def make_image_links(folder: str, num_images: int) -> None:
    """One hard link per json image (``0000001.jpg`` ...) to a few 1920x1080 JPEG files: real headers, little
    disk. Symbolic links where hard links are refused."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(1, num_images + 1):
        link = os.path.join(folder, f"{i:07d}.jpg")
        if os.path.exists(link):
            continue
        source = os.path.join(folder, f"source{i // LINKS_PER_FILE}.jpeg")
        if not os.path.exists(source):
            Image.new("RGB", SCALE_SIZE, (90, 120, 30)).save(source, quality=80)
        try:
            os.link(source, link)
        except OSError:
            os.symlink(os.path.abspath(source), link)


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (VmHWM), so a step's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_gb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def run_phase(phase: str, args) -> dict:
    """One step in this (fresh) process: {'seconds', 'peak_gb' (peak RSS above the RSS before the step)}."""
    import gc

    import torch  # noqa: F401  (imported before the step, so its memory is not counted)

    from src.data.coco_dataset import CocoDetection
    from src.data.coco_json import gc_paused
    from src.solver.evaluator import CocoEvaluator, evaluator_for

    ann, images, cache = _scale_paths(args)
    dataset = None
    if phase.startswith("evaluator"):
        dataset = CocoDetection(images, ann, check_images=False)
        gc.collect()
    base = _rss_gb()
    _reset_peak()
    start = time.perf_counter()
    out = {}
    if phase == "json_load":
        with open(ann) as f:
            json.load(f)
    elif phase == "json_load_gc_paused":
        with open(ann) as f, gc_paused():
            json.load(f)
    elif phase == "pycocotools":
        import contextlib
        import io

        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(ann)
    elif phase == "dataset":
        CocoDetection(images, ann, check_images=False)
    elif phase in ("headers_cold", "headers_cached"):
        ds = CocoDetection(images, ann, check_images=True, header_cache=cache)
        out["images"] = len(ds)
    elif phase == "evaluator":   # what a run does: from the dataset's parse, index at the first evaluation
        evaluator = evaluator_for(dataset, dataset.classes)
        out["construct_seconds"] = time.perf_counter() - start
        evaluator.coco_gt
    elif phase == "evaluator_json":   # before: the evaluator read the json again
        CocoEvaluator(ann, dataset.label_to_category_id, image_ids=dataset.image_ids).coco_gt
    else:
        raise ValueError(f"unknown phase {phase!r}")
    out.update(seconds=time.perf_counter() - start, peak_gb=_peak_gb() - base)
    return out


def _scale_paths(args) -> tuple:
    tag = f"{args.images}x{args.boxes_per_image}"
    return (os.path.join(args.workdir, f"instances_{tag}.json"), os.path.join(args.workdir, "images"),
            os.path.join(args.workdir, f"header_cache_{tag}"))


def _child(phase: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.data_bench", "--scale", "--phase", phase, "--images", str(args.images),
           "--boxes-per-image", str(args.boxes_per_image), "--workdir", args.workdir]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale_main(args) -> None:
    ann, images, cache = _scale_paths(args)
    os.makedirs(args.workdir, exist_ok=True)
    if not os.path.isfile(ann):
        start = time.perf_counter()
        n = write_large_coco_json(ann, args.images, args.boxes_per_image)
        print(f"generated {ann}: {args.images} images, {n} annotations ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    make_image_links(images, args.images)
    print(f"image links in {images} ({time.perf_counter() - start:.1f} s)")
    shutil.rmtree(cache, ignore_errors=True)
    print(f"{ann}: {os.path.getsize(ann) / 1e6:.0f} MB; python {platform.python_version()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    r = {phase: _child(phase, args) for phase in ("json_load", "json_load_gc_paused", "pycocotools", "dataset",
                                                  "headers_cold", "headers_cached", "evaluator", "evaluator_json")}
    ref = r["json_load"]

    def row(name, m):
        return (f"| {name} | {m['seconds']:.2f} | {m['peak_gb']:.2f} | {m['seconds'] / ref['seconds']:.2f} | "
                f"{m['peak_gb'] / ref['peak_gb']:.2f} |")
    print("| step | seconds | peak RSS above start, GB | time / json.load | memory / json.load |")
    print("|---|---:|---:|---:|---:|")
    names = {"json_load": "json.load", "json_load_gc_paused": "json.load, collector paused",
             "pycocotools": "pycocotools COCO()", "dataset": "CocoDetection, check_images: false",
             "headers_cold": "CocoDetection, header check, cold cache",
             "headers_cached": "CocoDetection, header check, cached",
             "evaluator": "evaluator_for + COCO index (from the dataset's parse)",
             "evaluator_json": "CocoEvaluator(json path) + COCO index (a second read, as before)"}
    for phase, name in names.items():
        print(row(name, r[phase]))
    check = {k: r[k]["seconds"] - r["dataset"]["seconds"] for k in ("headers_cold", "headers_cached")}
    print(f"header check ({r['headers_cold']['images']} images): cold {check['headers_cold']:.2f} s, cached "
          f"{check['headers_cached']:.2f} s (construction with the check minus without); evaluator_for itself "
          f"{r['evaluator']['construct_seconds']:.2f} s, the COCO index at the first evaluation the rest")


if __name__ == "__main__":
    main()
