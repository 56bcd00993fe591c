"""Convert DAIR-V2X-I camera labels to COCO json (instances_{split}.json) and print a summary.

    python tools/convert_dairv2x.py --root dataset/dairv2x --out dataset/dairv2x/annotations \
        --split-json dataset/dairv2x/single-infrastructure-split-data.json

ROOT is the released single-infrastructure-side folder (images in ROOT/image/). Nothing is written unless
every frame checks out; exit status 2 with a message naming the file otherwise.
Train with img_folder = ROOT/image and ann_file = OUT/instances_train.json (configs/dataset/dairv2x.yaml).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="DAIR-V2X-I folder with image/, label/camera/, data_info.json")
    p.add_argument("--out", required=True, help="output folder for instances_{split}.json")
    p.add_argument("--split-json", default=None,
                   help='{"train": [ids], "val": [ids], "test": [ids]}: the official one is the devkit\'s '
                        "data/split_datas/single-infrastructure-split-data.json; default: a seeded train/val "
                        "split of whole blocks of consecutive frames")
    p.add_argument("--splits", nargs="+", default=None, choices=["train", "val", "test"],
                   help="convert only these splits (default: all of the split file, or train and val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="val share of the default split")
    p.add_argument("--block-size", type=int, default=50,
                   help="default split: frames per block of consecutive frame ids of one camera (kept together)")
    p.add_argument("--skip-missing-labels", action="store_true",
                   help="leave out frames without a camera label file (counted) instead of stopping")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from src.core.yaml_utils import DataError
    from src.data.dairv2x import convert_dairv2x

    args = parse_args(argv)
    try:
        report = convert_dairv2x(args.root, args.out, split_json=args.split_json, seed=args.seed,
                                 val_fraction=args.val_fraction, block_size=args.block_size,
                                 skip_missing_labels=args.skip_missing_labels, splits=args.splits)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'instances_{s}.json' for s in report.images)} to {args.out}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
