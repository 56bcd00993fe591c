"""Export a detector + postprocessor to ONNX with the official RT-DETR deployment interface.

    python tools/export_onnx.py -c configs/dset4_r18_ratio0.3.yaml -r output/run/best.pth --out model.onnx --check

Graph inputs ``images`` [N, 3, H, W] float32 (RGB in [0, 1], resized to the config's eval_spatial_size as
the val transforms do) and ``orig_target_sizes`` [N, 2] int64 as (w, h); outputs ``labels`` [N, K] int64,
``boxes`` [N, K, 4] float32 xyxy in orig_target_sizes pixels, ``scores`` [N, K] float32. N is dynamic;
H, W are fixed to the config's eval_spatial_size (anchors, position embeddings and DSET's patch grid and
top-k count are constants of the graph). DSET's pruner is in the graph: top-k patches at the config's
keep_ratio (as after warmup), gather, attention over the kept tokens, scatter back. MoE layers are exported
in gather dispatch by default (the assignments sorted by expert, each expert run on its slice with bounds the
graph computes, the outputs gathered back: the top-k work only); ``--moe-dispatch dense`` exports every expert on every token, weighted by the top-k
routing (static shapes for runtimes that want them, E / top_k x the expert work). Same outputs either way.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, opset 17; it needs only the
``onnx`` package (no onnxscript), works offline. ``--check`` runs onnxruntime (CPU) on a random input of
batch 2 and prints the largest difference from PyTorch. Details: docs/performance.md#onnx-export.
"""
from __future__ import annotations

import argparse
import sys

import torch

from src.misc.checkpoint import add_trust_option
from src.zoo.rtdetr.deploy import (OPSET, OUTPUT_NAMES, DeployModel, add_fuse_option, export,  # noqa: F401
                                   fuse_for_inference, load_detector, pruning_summary, set_moe_dispatch,
                                   write_class_metadata)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("-r", "--resume", help="checkpoint whose weights are exported (EMA when present)")
    p.add_argument("--random-weights", action="store_true",
                   help="export the randomly initialised model (tests only); required when -r is not given")
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on a random input")
    p.add_argument("--moe-dispatch", choices=("gather", "dense"), default="gather",
                   help="MoE layers in the graph: gather (default: each expert on its own tokens, computed slices) "
                        "or dense (every expert on every token: static shapes, E / top_k x the expert work)")
    add_trust_option(p)
    add_fuse_option(p)
    args = p.parse_args(argv)
    if bool(args.resume) == bool(args.random_weights):
        p.error("give -r CKPT (the weights to export) or --random-weights (tests), exactly one of them")
    return args


def input_hw(cfg) -> tuple:
    size = cfg.get("eval_spatial_size")
    if not size:
        raise ValueError(f"{cfg.path}: eval_spatial_size [h, w] is needed to export (the graph's input size)")
    return int(size[0]), int(size[1])


def check(deploy: DeployModel, path: str, hw: tuple, batch: int = 2, seed: int = 0) -> dict:
    """Run the ONNX file in onnxruntime (CPU) and PyTorch on the same random input.

    Returns {'labels_equal': fraction of equal labels, 'max_abs_diff_boxes', 'max_abs_diff_scores'}.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(path))
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *hw, generator=g)
    sizes = torch.tensor([[hw[1] * 2, hw[0] * 2]] * batch, dtype=torch.int64)
    with torch.no_grad():
        ref = [t.numpy() for t in deploy(images, sizes)]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUT_NAMES, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    return {"labels_equal": float((ref[0] == got[0]).mean()),
            "max_abs_diff_boxes": float(abs(ref[1] - got[1]).max()),
            "max_abs_diff_scores": float(abs(ref[2] - got[2]).max())}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, model, post = load_detector(args.config, args.update, checkpoint=args.resume,
                                         random_weights=args.random_weights, trusted=args.trust_checkpoint)
        hw = input_hw(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad input (ConfigError is a ValueError): a message
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.random_weights:
        print("WARNING: exporting RANDOM weights (--random-weights): for tests only", file=sys.stderr)
    # sorted traces as gather (MoEFFN.resolved_dispatch); dense traces as dense
    n_moe = set_moe_dispatch(model, "dense" if args.moe_dispatch == "dense" else "sorted")
    deploy = DeployModel(fuse_for_inference(model) if args.fuse else model, post).eval()
    export(deploy, args.out, hw)
    if cfg.checkpoint_classes is not None:
        write_class_metadata(args.out, cfg.checkpoint_classes)
    else:
        print("note: no class list in the checkpoint (random weights or an older run): the ONNX file names no "
              "classes", file=sys.stderr)
    print(f"wrote {args.out}: opset {OPSET}, images [N, 3, {hw[0]}, {hw[1]}] (N dynamic), orig_target_sizes "
          f"[N, 2] (w, h) -> labels, boxes, scores [N, {post.num_top_queries}]")
    for line in pruning_summary(model):
        print("  " + line)
    if n_moe:
        print(f"  {n_moe} MoE layers in {args.moe_dispatch} dispatch")
    if args.check:
        diff = check(deploy, args.out, hw)
        print(f"onnxruntime vs PyTorch (random input, batch 2): max |d scores| {diff['max_abs_diff_scores']:.2e}, "
              f"max |d boxes| {diff['max_abs_diff_boxes']:.2e} px, equal labels {diff['labels_equal']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
