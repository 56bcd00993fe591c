"""Host-to-device copies that do not make the host wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable host memory with a blocking copy: the host waits
until the device has finished everything queued before it (a device sync, reported by
``torch.cuda.set_sync_debug_mode``). Tensors built on the host from Python values (counts, sizes, index
arrays from scipy) go to the device with ``to_device``: pinned and non-blocking on CUDA, a no-op elsewhere.
"""
from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` (a CPU tensor the caller does not change afterwards) on ``device`` (None: the CPU) without a
    device sync."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()  # a copy from pinned memory is truly asynchronous
    return host.to(device, non_blocking=True)


def tensor_on(values, device, dtype=None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without the blocking copy (see ``to_device``)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_float32(tree):
    """``tree`` (tensors in nested dicts / lists / tuples) with every float16 / bfloat16 tensor cast to
    float32; other leaves unchanged. Evaluation under autocast hands float32 to postprocessing and metrics."""
    if torch.is_tensor(tree):
        return tree.float() if tree.dtype in (torch.float16, torch.bfloat16) else tree
    if isinstance(tree, dict):
        return {k: to_float32(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple
        return type(tree)(*(to_float32(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float32(v) for v in tree)
    return tree
