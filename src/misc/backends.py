"""CUDA backend settings of a run: cuDNN autotuning and float32 matmul precision (TF32).

- ``cudnn_benchmark`` (config key; null = auto): cuDNN times its convolution algorithms for each new input
  shape and keeps the fastest. Worth it for fixed-size inputs (the default pipelines resize to
  ``input_size``); with multi-scale training (``collate_fn.scales``) every new size is timed again, so auto
  turns it off then, and ``deterministic: true`` always turns it off.
- ``float32_matmul_precision`` (config key, default ``high``): ``high`` lets float32 matmuls and convolutions
  use TF32 tensor cores on Ampere and newer GPUs (about 10 mantissa bits inside the products, float32
  accumulation), ``highest`` keeps full float32. Applied on CUDA only: on CPU it could change the numerics
  of the float32 path that the bit-exact resume tests rely on.
"""
from __future__ import annotations

from typing import Optional

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def configure_backends(device: torch.device, cudnn_benchmark: Optional[bool], matmul_precision: str,
                       multiscale: bool, deterministic: bool) -> dict:
    """Apply the settings for ``device``; returns what was set: {'cudnn_benchmark': bool | None,
    'float32_matmul_precision': str | None} (None: not applied, e.g. on CPU)."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"float32_matmul_precision = {matmul_precision!r}: use one of {', '.join(MATMUL_PRECISIONS)}")
    if device.type != "cuda":
        return {"cudnn_benchmark": None, "float32_matmul_precision": None}
    bench = (not multiscale) if cudnn_benchmark is None else bool(cudnn_benchmark)
    bench = bench and not deterministic
    torch.backends.cudnn.benchmark = bench
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    return {"cudnn_benchmark": bench, "float32_matmul_precision": matmul_precision}
