"""Random-number-generator state: seeding, and capture/restore for exact resume.

The captured state holds only tensors, ints, floats, strings, lists and dicts, so it can be
stored in a checkpoint that is loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "seed_everything", "rng_preserved"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices).

    Args:
        seed: the seed. Under DDP pass ``seed + rank`` if ranks should draw different
            augmentations (DDP broadcasts rank 0's initial weights anyway).
        deterministic: True calls ``torch.use_deterministic_algorithms(True, warn_only=True)``
            (non-deterministic ops warn instead of failing), sets cudnn.deterministic=True,
            cudnn.benchmark=False and CUBLAS_WORKSPACE_CONFIG=:4096:8 if unset (call this
            before any CUDA work for the latter to take effect). False turns these off.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def get_rng_state() -> dict:
    """Snapshot of every generator: ``{'python', 'numpy', 'torch', 'cuda'}``.

    python: ``{'version': int, 'state': int64 tensor[625], 'gauss_next': float | None}``;
    numpy: ``{'bit_generator': str, 'key': int64 tensor[624], 'pos': int, 'has_gauss': int,
    'cached_gaussian': float}``; torch: uint8 tensor; cuda: list of uint8 tensors (one per
    device, empty without CUDA).
    """
    py_version, py_state, gauss_next = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(np_name),
                  "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64).copy()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore a snapshot from ``get_rng_state``.

    CUDA states are restored when the device count matches; otherwise they are skipped with a
    warning (resuming on a different number of GPUs cannot reproduce the CUDA streams).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["bit_generator"], npst["key"].numpy().astype(np.uint32),
                         npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"set_rng_state: checkpoint has {len(cuda)} CUDA generator states, this "
                          f"machine has {torch.cuda.device_count()} devices; CUDA generators are "
                          f"not restored")
            return
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


@contextlib.contextmanager
def rng_preserved():
    """Run a block (evaluation) without moving the python / numpy / torch generators of training, so a
    resumed run (whose checkpoint holds the RNG state of the end of training) continues the same stream."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
