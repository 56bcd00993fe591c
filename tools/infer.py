"""Run a detector on images: one PNG per image (detections, and for DSET the kept patches of every pruned
level) and one COCO-results json for the whole input.

    python tools/infer.py -c configs/dset4_r18_ratio0.3.yaml -r output/run/best.pth --input photos/ --out out/

Each image goes through the config's val transforms (e.g. Resize to [h, w]; no letterbox: the aspect ratio
changes exactly as in evaluation), is padded bottom/right to the val collate's size_divisibility, and the
boxes are mapped back to the ORIGINAL image pixels (x * orig_w / resized_w, y * orig_h / resized_h).

Writes into --out:
  ``<stem>.png``        detections with class and score (score >= --score); for DSET one panel per pruned
                        level: pruned area dimmed, kept patches outlined, keep ratio in the title.
  ``detections.json``   COCO results: [{image_id, category_id, bbox [x, y, w, h] original pixels, score,
                        file_name}] for every detection with score >= --score.
  ``images.json``       [{id, file_name, width, height}]: the image ids used. An image whose file name is in
                        the config's val annotation file gets that file's id (so detections.json can be
                        evaluated against it); otherwise ids count 1, 2, ... in sorted file-name order.
Class names come from the checkpoint's training class list; category ids are the val annotation file's,
matched by name, when it exists (else the training ids). A checkpoint without a class list falls back to the
val file's categories in id order, else ``class <label>`` and category_id = label (a warning says so).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from src.data.classes import match_classes
from src.data.coco_dataset import load_coco_json
from src.misc.checkpoint import add_trust_option
from src.misc.visualize import detection_figure, patch_rects
from src.zoo.rtdetr.deploy import (add_fuse_option, fuse_for_inference, inference_memory_format, load_detector,
                                   to_memory_format)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("-r", "--resume", help="checkpoint (EMA weights when present)")
    p.add_argument("--random-weights", action="store_true", help="random weights (tests only); instead of -r")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score", type=float, default=0.4, help="score threshold of drawn and written detections")
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by file name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_trust_option(p)
    add_fuse_option(p)
    args = p.parse_args(argv)
    if bool(args.resume) == bool(args.random_weights):
        p.error("give -r CKPT or --random-weights (tests), exactly one of them")
    return args


def list_images(path: str) -> List[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def val_pipeline(cfg):
    """(transforms, size_divisibility) of the config's val loader; Resize to eval_spatial_size without one."""
    section = cfg.get("val_dataloader") or {}
    spec = (section.get("dataset") or {}).get("transforms")
    if spec is None:
        size = cfg.get("eval_spatial_size")
        if not size:
            raise ValueError(f"{cfg.path}: neither val_dataloader.dataset.transforms nor eval_spatial_size is set")
        spec = {"type": "Compose", "ops": [{"type": "Resize", "size": list(size)}, {"type": "ConvertPILImage"}]}
    transforms = cfg.build_spec(spec, ("val_dataloader", "dataset", "transforms"))
    collate = section.get("collate_fn") or {}
    return transforms, int(collate.get("size_divisibility", 32))


def preprocess(image, transforms, divisibility: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """PIL image -> (padded input [3, Hp, Wp] float, (resized_w, resized_h) of its content)."""
    x = transforms(image).as_subclass(torch.Tensor)
    if x.dtype == torch.uint8:
        raise ValueError("the val transforms must end with ConvertPILImage (float image in [0, 1])")
    rh, rw = x.shape[-2:]
    hp, wp = -(-rh // divisibility) * divisibility, -(-rw // divisibility) * divisibility
    padded = x.new_zeros(3, hp, wp)
    padded[:, :rh, :rw] = x
    return padded, (rw, rh)


def to_original(padded_hw, resized_wh, orig_wh) -> torch.Tensor:
    """[2] (w, h) multiplier taking boxes normalised to the padded input to original-image pixels."""
    hp, wp = padded_hw
    (rw, rh), (ow, oh) = resized_wh, orig_wh
    return torch.tensor([wp * ow / rw, hp * oh / rh], dtype=torch.float32)


def kept_patch_rects(info: dict, padded_hw, resized_wh, orig_wh, patch_size: int) -> torch.Tensor:
    """[n, 4] xyxy original-image pixels of the patches one pruner kept for the (single) image."""
    hp, wp = padded_hw
    h, w = info["feat_shape"]
    rects = patch_rects(info["kept_patch_idx"][0].cpu(), info["patch_grid"],
                        (patch_size * hp / h, patch_size * wp / w), (resized_wh[1], resized_wh[0]))
    sx, sy = orig_wh[0] / resized_wh[0], orig_wh[1] / resized_wh[1]
    return rects * torch.tensor([sx, sy, sx, sy])


def categories(cfg, classes=None) -> Tuple[List[str], List[int], dict]:
    """(class name per label, category id per label, file_name -> image id).

    Names come from the checkpoint's training classes (`classes`); category ids are those of the val
    annotation file when it exists, matched by name (a training class it lacks keeps its training id), else
    the training ids. Without stored classes (random weights, an older checkpoint) the val file's categories
    in id order are assumed, with a warning."""
    ann = ((cfg.get("val_dataloader") or {}).get("dataset") or {}).get("ann_file")
    num_classes = int(cfg.get("num_classes") or 0)
    coco = load_coco_json(ann) if ann and os.path.isfile(ann) else None
    known = {img["file_name"]: img["id"] for img in coco["images"]} if coco else {}
    if classes is not None:
        ids = list(classes.category_ids)
        if coco:
            for label, cid in match_classes(classes, coco["categories"], where=ann).label_to_category_id.items():
                ids[label] = cid
        extra = range(len(ids), max(num_classes, len(ids)))
        return list(classes.names) + [f"class {i}" for i in extra], ids + list(extra), known
    if coco:
        print(f"warning: the checkpoint stores no class list; class names and ids are taken from {ann} in id order",
              file=sys.stderr)
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        names = [str(c.get("name", c["id"])) for c in cats]
        ids = [int(c["id"]) for c in cats]
        extra = range(len(ids), max(num_classes, len(ids)))
        return names + [f"class {i}" for i in extra], ids + list(extra), known
    print(f"warning: no class list in the checkpoint and no val annotation file ({ann}); class names are "
          f"'class <label>' and category_id = label", file=sys.stderr)
    return [f"class {i}" for i in range(num_classes)], list(range(num_classes)), {}


@torch.no_grad()
def run(args) -> dict:
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    files = list_images(args.input)[:getattr(args, "limit", None)]  # before the model: a bad --input fails fast
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, post = load_detector(args.config, args.update, checkpoint=args.resume,
                                     random_weights=args.random_weights, trusted=args.trust_checkpoint,
                                     device=device)
    if getattr(args, "fuse", True):  # callers that build args themselves get the tool's default
        fuse_for_inference(model)  # RepVGG and conv-norm folded: the same detections, fewer operators
    memory_format = inference_memory_format(device)  # channels_last on a CPU: the same detections, faster convs
    to_memory_format(model, memory_format)
    transforms, divisibility = val_pipeline(cfg)
    names, category_ids, known_ids = categories(cfg, cfg.checkpoint_classes)
    patch_size = cfg.dset.pruner.patch_size if cfg.dset is not None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    next_id = max([0] + [i for i in known_ids.values() if isinstance(i, int)]) + 1 if known_ids else 1
    results, images = [], []
    for path in files:
        pil = Image.open(path).convert("RGB")
        x, resized_wh = preprocess(pil, transforms, divisibility)
        padded_hw = tuple(x.shape[-2:])
        outputs = model(x.unsqueeze(0).to(device).contiguous(memory_format=memory_format))
        scale = to_original(padded_hw, resized_wh, pil.size).to(device).unsqueeze(0)
        labels, boxes, scores = (t[0].cpu() for t in post.forward_batched(outputs, scale))
        keep = scores >= args.score
        labels, boxes, scores = labels[keep], boxes[keep], scores[keep]
        if path.name in known_ids:
            image_id = known_ids[path.name]
        else:
            image_id, next_id = next_id, next_id + 1
        images.append({"id": image_id, "file_name": path.name, "width": pil.size[0], "height": pil.size[1]})
        wh = boxes[:, 2:] - boxes[:, :2]
        results += [{"image_id": image_id, "file_name": path.name, "category_id": category_ids[lab]
                     if lab < len(category_ids) else lab, "bbox": [round(v, 2) for v in (b[0], b[1], s[0], s[1])],
                     "score": round(sc, 5)}
                    for lab, b, s, sc in zip(labels.tolist(), boxes.tolist(), wh.tolist(), scores.tolist())]
        levels = []
        for i, info in enumerate(outputs.get("dset_prune_info") or []):
            rects = kept_patch_rects(info, padded_hw, resized_wh, pil.size, patch_size)
            levels.append((f"pruned level {i} (stride {padded_hw[0] // info['feat_shape'][0]})", rects,
                           float(info["keep_ratio"])))
        fig = detection_figure(np.asarray(pil), boxes, labels, scores, names, levels,
                               title=f"{path.name}  ({Path(args.config).name}, input {padded_hw[1]}x{padded_hw[0]})")
        fig.savefig(out / f"{path.stem}.png", dpi=130)
        plt.close(fig)
    (out / "detections.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(images, indent=1))
    return {"images": images, "detections": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad input (ConfigError is a ValueError): a message
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = Path(args.out) / f"{Path(res['images'][0]['file_name']).stem}.png"
    print(f"{len(res['images'])} image(s), {len(res['detections'])} detection(s) with score >= {args.score}: "
          f"{args.out}/<name>.png, {args.out}/detections.json, {args.out}/images.json")
    print(f"picture: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
