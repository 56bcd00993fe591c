"""Generate the synthetic roadside detection dataset (COCO format) and print its statistics.

    python tools/make_synthetic_roadside.py --out dataset/roadside_synth --num-train 48 --num-val 16 --seed 0
    python tools/make_synthetic_roadside.py --out dataset/roadside_synth_large --num-train 4000 --num-val 400 --workers 8
"""
from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (images/{train,val}, annotations/)")
    p.add_argument("--num-train", type=int, default=48)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-objects", type=int, default=20, help="objects placed per image, at least")
    p.add_argument("--max-objects", type=int, default=40, help="objects placed per image, at most")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="rendering processes (the output does not depend on it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from src.data.synthetic_roadside import compute_split_statistics, format_statistics, generate_dataset

    args = parse_args(argv)
    start = time.perf_counter()
    splits = generate_dataset(args.out, num_train=args.num_train, num_val=args.num_val, width=args.width,
                              height=args.height, seed=args.seed, min_objects=args.min_objects,
                              max_objects=args.max_objects, image_format=args.format,
                              workers=args.workers)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    for split, coco in splits.items():
        print(format_statistics(split, compute_split_statistics(coco)))


if __name__ == "__main__":
    main()
