"""The epoch of a training loader, carried to its worker processes with every index.

Loader workers hold copies of the dataset and the collate function. Without ``persistent_workers`` they are
new copies every epoch, so ``set_epoch`` in the main process reaches them; with persistent workers the
copies of epoch 0 would live on, and an epoch policy (``Compose`` ``stop_epoch``, multi-scale
``stop_epoch``) would silently never switch. Here the sampler sends ``EpochIndex(index, epoch, seed)``
and the dataset calls :func:`sync_epoch` first: on the first index of a new epoch in a process it sets the
epoch on itself and on its ``epoch_listeners`` (the collate function), and in a worker it reseeds
``random``, numpy and torch from (the epoch's seed, worker id). So persistent and fresh workers produce the
same batches (tests/test_loader_workers.py), and a resumed run's workers start where the uninterrupted
run's were. Without workers (``num_workers: 0``) nothing is reseeded: the main process's generators are
the checkpointed ones.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info


class EpochIndex(NamedTuple):
    """One sampled index with the epoch it belongs to and the workers' seed of that epoch."""
    index: int
    epoch: int
    seed: int


def seed_worker(seed: int, worker_id: int) -> None:
    """Seed ``random``, numpy's global generator and torch in this process from (seed, worker_id)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(worker_id)]).generate_state(4, dtype=np.uint32)
    random.seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(state[2:])
    torch.manual_seed(int(state[0]) << 31 ^ int(state[3]))


def sync_epoch(dataset, item):
    """The plain index of ``item`` (an int, or an :class:`EpochIndex` from a training loader's sampler).

    On the first ``EpochIndex`` of an epoch (or of another pass over it: another seed) in this process:
    ``dataset.set_epoch(epoch)``, ``set_epoch`` on each of ``dataset.epoch_listeners`` and, inside a loader
    worker, :func:`seed_worker`."""
    if not isinstance(item, EpochIndex):
        return item
    if getattr(dataset, "_synced_epoch", None) != (item.epoch, item.seed):  # a new epoch, or a new pass of it
        dataset._synced_epoch = (item.epoch, item.seed)
        dataset.set_epoch(item.epoch)
        for listener in getattr(dataset, "epoch_listeners", ()):
            listener.set_epoch(item.epoch)
        info = get_worker_info()
        if info is not None:
            seed_worker(item.seed, info.id)
    return item.index
