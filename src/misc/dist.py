"""Distributed helpers: the one place that talks to torch.distributed."""
import os
import socket
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as tdist
from torch import nn


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


def rank_placement(local_rank: int, local_world_size: int, num_gpus: int) -> Tuple[str, str]:
    """``(device, backend)`` of one torchrun rank; ``num_gpus`` 0 means CPU ranks.

    CPU: gloo. A GPU per local rank: nccl, rank r on ``cuda:r``. More local ranks than GPUs (e.g. 2 ranks on a
    1-GPU machine, as bench/gpu_check.py runs them): NCCL refuses two ranks on one GPU, so gloo (its all-reduce
    goes through host memory: a check of the DDP code, not a fast way to train), rank r on ``cuda:(r % num_gpus)``.
    """
    if num_gpus <= 0:
        return "cpu", "gloo"
    if local_world_size <= num_gpus:
        return f"cuda:{local_rank}", "nccl"
    return f"cuda:{local_rank % num_gpus}", "gloo"


def init_distributed(device: str | None = None) -> Optional[str]:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set) and return this rank's
    device (``rank_placement``: nccl with a GPU per rank, gloo on CPU or when ranks share a GPU); None when not
    distributed. Without torchrun, a ``cuda:N`` device becomes the current CUDA device (so kernels and
    allocations that name no device land on N, not on GPU 0).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if device is not None and str(device).startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))
        return None
    use_cuda = str(device).startswith("cuda") or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} under torchrun, but no CUDA device is visible here; run with "
                           f"--device cpu, or on a machine with a GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    rank_device, backend = rank_placement(local_rank, local_world, torch.cuda.device_count() if use_cuda else 0)
    if rank_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rank_device))
        if backend == "gloo" and local_rank == 0:
            print(f"[ddp] {local_world} ranks share {torch.cuda.device_count()} GPU(s): backend gloo (NCCL needs a "
                  f"GPU per rank)", flush=True)
    tdist.init_process_group(backend=backend)
    return rank_device


def barrier():
    if is_dist_available_and_initialized():
        tdist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group."""
    if not is_dist_available_and_initialized():
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without a process group."""
    if not is_dist_available_and_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mean over ranks of each scalar in ``values``; a key missing on a rank counts as 0 there.

    Ranks may produce different loss keys (a rank whose batch has no box gets no denoising terms), and
    reducing key by key would then pair different tensors or hang. So the key union is agreed first (one
    all_gather_object of the names), then every value goes through ONE all_reduce of a stacked vector.
    Identity without a process group.
    """
    return _reduce_named(values, torch.float32, mean=True)


def sum_over_ranks(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Sum over ranks of each scalar in ``values`` in float64 (counts and sums of an evaluation); like
    ``mean_over_ranks``: the key union is agreed, then ONE all_reduce. Identity without a process group."""
    return _reduce_named(values, torch.float64, mean=False)


def _reduce_named(values: Dict[str, torch.Tensor], dtype: torch.dtype, mean: bool) -> Dict[str, torch.Tensor]:
    if not is_dist_available_and_initialized():
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()}
    names = sorted(set().union(*all_gather_object(sorted(values))))
    if not names:
        return {}
    ref = next(iter(values.values()), None)
    device = ref.device if torch.is_tensor(ref) else (
        torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu"))
    stacked = torch.stack([values[k].detach().to(dtype).reshape(()).to(device) if k in values
                           else torch.zeros((), device=device, dtype=dtype) for k in names])
    reduced = all_reduce_mean(stacked) if mean else all_reduce_sum(stacked)
    return dict(zip(names, reduced.unbind(0)))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for torchrun's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
