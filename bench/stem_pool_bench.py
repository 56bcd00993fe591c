"""The stem max pool on a CPU: PyTorch's ``F.max_pool2d(x, 3, 2, 1)`` against ``src/nn/pooling.py::stem_max_pool``,
alone on the stem map and inside a whole ``plain_p5`` forward (the fused deploy model of bench/latency_bench.py),
interleaved A B A B, medians. Run it on a quiet machine.

    python -m bench.stem_pool_bench                     # 640x640 (stem map [1, 64, 320, 320])
    python -m bench.stem_pool_bench --input 736x1280 --repeats 10
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import src.nn.backbone.presnet as presnet
from bench.latency_bench import build, interleaved_ms, parse_hw
from src.nn.pooling import stem_max_pool


def interleaved(fns: dict, repeats: int) -> dict:
    """name -> median ms of ``fns[name]()``, timed A B A B ... after one untimed call each."""
    for fn in fns.values():
        fn()
    return {name: statistics.median(v) for name, v in interleaved_ms(fns, repeats).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=parse_hw, default=(640, 640), help="HxW of the network input")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    h, w = args.input
    stem = torch.randn(1, 64, (h + 1) // 2, (w + 1) // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stem_max_pool(stem), F.max_pool2d(stem, 3, 2, 1))
        alone = interleaved({"F.max_pool2d": lambda: F.max_pool2d(stem, 3, 2, 1),
                             "stem_max_pool": lambda: stem_max_pool(stem)}, 5 * args.repeats)
        # channels-first, where the two differ (a channels_last map, as the deployed CPU model has since
        # deploy.inference_memory_format, takes F.max_pool2d either way: its kernel is the fast one there)
        model = build("plain_p5", (h, w), "cpu", memory_format=torch.contiguous_format)
        images, sizes = torch.rand(1, 3, h, w), torch.tensor([[w, h]])
        pools = {"F.max_pool2d": lambda t: F.max_pool2d(t, 3, 2, 1), "stem_max_pool": stem_max_pool}

        def forward_with(name):
            def run():
                presnet.stem_max_pool = pools[name]
                try:
                    model(images, sizes)
                finally:
                    presnet.stem_max_pool = stem_max_pool
            return run
        whole = interleaved({name: forward_with(name) for name in pools}, args.repeats)
    print(f"stem map {tuple(stem.shape)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    for name in pools:
        print(f"{name:>14}: pool alone {alone[name]:7.1f} ms, plain_p5 forward {h}x{w} {whole[name]:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
