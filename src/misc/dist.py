"""Distributed helpers: the one place that talks to torch.distributed."""
import os

import torch
import torch.distributed as tdist


def is_dist_available_and_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_world_size() -> int:
    return tdist.get_world_size() if is_dist_available_and_initialized() else 1


def get_rank() -> int:
    return tdist.get_rank() if is_dist_available_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    if not is_dist_available_and_initialized():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_dist_available_and_initialized():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t


def init_distributed(device: str | None = None) -> bool:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set).

    Uses nccl on CUDA and gloo on CPU. Returns True when running distributed.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend=backend)
    return True


def barrier():
    if is_dist_available_and_initialized():
        tdist.barrier()
