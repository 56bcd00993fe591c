"""Convert DAIR-V2X-I camera labels to COCO json (instances_{split}.json) and print a summary.

    python tools/convert_dairv2x.py --root dataset/dairv2x --out dataset/dairv2x/annotations \
        --split-json dataset/dairv2x/single-infrastructure-split-data.json

Train with img_folder = ROOT/image and ann_file = OUT/instances_train.json (configs/dataset/dairv2x.yaml).
"""
from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="DAIR-V2X-I folder with image/, label/camera/, data_info.json")
    p.add_argument("--out", required=True, help="output folder for instances_{split}.json")
    p.add_argument("--split-json", default=None, help='{"train": [ids], "val": [ids], "test": [ids]}; '
                                                      "default: seeded train/val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the default split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="val share of the default split")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from src.data.dairv2x import convert_dairv2x

    args = parse_args(argv)
    report = convert_dairv2x(args.root, args.out, split_json=args.split_json, seed=args.seed,
                             val_fraction=args.val_fraction)
    print(f"wrote {', '.join(f'instances_{s}.json' for s in report.images)} to {args.out}")
    print(report.summary())


if __name__ == "__main__":
    main()
