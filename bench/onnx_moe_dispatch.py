"""DSET's MoE layers in an onnxruntime graph: the gather dispatch (the export default, each expert on its own
tokens) against the dense one (every expert on every token, static shapes), same weights, timed interleaved on a
CPU. Run it on a quiet machine.

    python -m bench.onnx_moe_dispatch                     # dset_k0.3_moe at 640x640, 15 repeats
    python -m bench.onnx_moe_dispatch --input 736x1280 --repeats 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.latency_bench import build, interleaved_ms, parse_hw
from src.zoo.rtdetr.deploy import export, set_moe_dispatch

DISPATCHES = {"gather": "auto", "dense": "dense"}  # graph name -> MoEFFN.dispatch traced as that graph


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="dset_k0.3_moe", help="a bench/latency_bench.py variant with MoE")
    p.add_argument("--input", type=parse_hw, default=(640, 640), help="HxW of the network input")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats: at least 2 (quartiles)")
    h, w = args.input
    deploy = build(args.variant, (h, w), "cpu")
    feed = {"images": torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).numpy(),
            "orig_target_sizes": np.array([[w, h]], dtype=np.int64)}
    sessions, nodes = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, dispatch in DISPATCHES.items():
            if set_moe_dispatch(deploy.model, dispatch) == 0:
                p.error(f"--variant {args.variant} has no MoE layer")
            path = os.path.join(folder, f"{name}.onnx")
            export(deploy, path, (h, w))
            nodes[name] = len(onnx.load(path).graph.node)
            sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    labels = {name: sess.run(None, feed)[0] for name, sess in sessions.items()}  # also the warm-up
    times = interleaved_ms({name: (lambda x=sess: x.run(None, feed)) for name, sess in sessions.items()},
                           args.repeats)
    print(f"{args.variant} {h}x{w}, onnxruntime {ort.__version__} CPU, {args.repeats} interleaved repeats; "
          f"same top-k labels: {bool(np.array_equal(labels['gather'], labels['dense']))}")
    for name, values in times.items():
        q = statistics.quantiles(values, n=4, method="inclusive")
        print(f"{name:>7} dispatch: {statistics.median(values):7.1f} ms (p25 {q[0]:.1f}, p75 {q[2]:.1f}), "
              f"{nodes[name]} graph nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
