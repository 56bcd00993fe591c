"""Training logs: TensorBoard scalars/images, a JSON-lines epoch log, and console progress.

* ``TrainLogger`` (create with ``enabled=is_main_process()``): TensorBoard events under
  ``output_dir/tb`` and one JSON object per ``epoch_record`` call in ``output_dir/log.jsonl``.
  Disabled loggers accept every call and do nothing, so the training loop needs no rank checks.
* ``SmoothedValue``: windowed median / average plus the global average of a series.
* ``ProgressMeter``: one console line every ``print_freq`` iterations with the smoothed losses,
  learning rate, iteration time and ETA. Values may be tensors: they are buffered and converted
  to floats only when a line is printed (one device sync per ``print_freq`` iterations).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections import deque
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as tdist

from src.misc.dist import all_reduce_sum, is_main_process

__all__ = ["TrainLogger", "SmoothedValue", "ProgressMeter", "to_python"]


def to_python(obj):
    """JSON-ready copy of ``obj``: tensors / numpy values become Python numbers or lists,
    non-finite floats become None (strict JSON has no NaN), dict keys become strings."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return to_python(obj.item() if obj.ndim == 0 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_python(obj.tolist())
    if isinstance(obj, np.generic):
        return to_python(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_python(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_python(v) for v in obj]
    return obj


def _flatten(values: dict, prefix: str) -> Dict[str, object]:
    out = {}
    for k, v in values.items():
        tag = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, tag))
        else:
            out[tag] = v
    return out


class TrainLogger:
    """TensorBoard + JSON-lines logger.

    Args:
        output_dir: run directory; events go to ``output_dir/tb``, records to ``output_dir/log.jsonl``.
        enabled: False (non-main ranks) makes every method a no-op and creates no files.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True):
        self.output_dir = os.fspath(output_dir)
        self.enabled = enabled
        self.writer = None
        self.jsonl_path = os.path.join(self.output_dir, "log.jsonl")
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(self.output_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=os.path.join(self.output_dir, "tb"))

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        """Log every entry of ``values`` (numbers or 0-dim tensors; nested dicts become
        'a/b' tags) as ``prefix/name`` at ``step``."""
        if not self.enabled:
            return
        for tag, v in _flatten(values, prefix).items():
            v = to_python(v)
            if not isinstance(v, (int, float)):
                raise TypeError(f"TrainLogger.scalars: {tag!r} is not a scalar (got {type(v).__name__})")
            self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, img, step: int) -> None:
        """Log an image: a tensor [3, H, W] (float in [0, 1] or uint8) or an ndarray [H, W, 3] uint8."""
        if not self.enabled:
            return
        if isinstance(img, torch.Tensor):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"TrainLogger.image {tag!r}: expected a [3, H, W] tensor, got {tuple(img.shape)}")
            self.writer.add_image(tag, img.detach().cpu(), step, dataformats="CHW")
        elif isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"TrainLogger.image {tag!r}: expected an [H, W, 3] uint8 array, "
                                 f"got {img.shape} {img.dtype}")
            self.writer.add_image(tag, img, step, dataformats="HWC")
        else:
            raise TypeError(f"TrainLogger.image {tag!r}: expected a tensor or ndarray, got {type(img).__name__}")

    def epoch_record(self, record: dict) -> None:
        """Append ``record`` (tensors/numpy converted, NaN -> null) as one line of log.jsonl."""
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(to_python(record), allow_nan=False) + "\n")
        self.writer.flush()

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.close()
            self.writer = None
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SmoothedValue:
    """A series of floats with a sliding window (median/avg/max) and a global average.

    Args:
        window_size: number of recent values kept for median / avg / max.
    """

    def __init__(self, window_size: int = 20):
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        """Add ``value`` (the mean over ``n`` samples)."""
        self.window.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else float("nan")

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else float("nan")

    @property
    def max(self) -> float:
        return max(self.window) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def global_avg_over_ranks(self) -> float:
        """Global average over all ranks (every rank must call; no state is changed)."""
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64,
                                        device=_reduce_device()))
        count, total = t.tolist()
        return total / count if count else float("nan")


def _reduce_device() -> torch.device:
    """Device for collective ops: CUDA when the process group is NCCL."""
    if tdist.is_available() and tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_lr(name: str) -> bool:
    return name == "lr" or name.endswith("_lr") or name.startswith("lr_")


class ProgressMeter:
    """Console progress for one epoch.

    Args:
        num_iters: iterations in the epoch (for '[i/n]' and the ETA).
        print_freq: print on iterations 0, print_freq, 2*print_freq, ... and the last one. The
            default 1 prints on every ``update`` call, for callers that already call ``update``
            only every N iterations.
        header: line prefix, e.g. 'Epoch [3]'.
        enabled: print only when True (default: main process only).
        window_size: smoothing window of the displayed medians.
        print_fn: called with each line (default ``print(..., flush=True)``).

    Usage::

        meter = ProgressMeter(len(loader), print_freq=20, header=f'Epoch [{epoch}]')
        for i, batch in enumerate(loader):
            ...
            meter.update(i, loss=loss.detach(), lr=optimizer.param_groups[0]['lr'], **loss_dict)
        epoch_stats = meter.averages()   # global averages, summed over ranks

    A printed line looks like::

        Epoch [3] [ 40/200] eta 0:01:23 loss 1.2345 (1.3456) lr 1.000e-04 time 0.512s (0.498s)

    with the window median and (global average) for each value, the current value for learning
    rates, and the time per iteration measured between consecutive ``update`` calls divided by
    the number of iterations between them (the first from the meter's construction or
    ``start()``), so calling ``update`` only every N iterations still gives per-iteration times.
    """

    def __init__(self, num_iters: int, print_freq: int = 1, header: str = "",
                 enabled: Optional[bool] = None, window_size: int = 20,
                 print_fn: Callable[[str], None] = None):
        if print_freq <= 0:
            raise ValueError(f"ProgressMeter: print_freq must be > 0, got {print_freq}")
        self.num_iters = int(num_iters)
        self.print_freq = int(print_freq)
        self.header = header
        self.enabled = is_main_process() if enabled is None else enabled
        self.window_size = window_size
        self.print_fn = print_fn or (lambda s: print(s, flush=True))
        self.meters: Dict[str, SmoothedValue] = {}
        self.iter_time = SmoothedValue(window_size)
        self._pending: Dict[str, List] = {}
        self.start()

    def start(self) -> None:
        """Reset the iteration clock (call right before the loop if construction was earlier)."""
        self._last = time.perf_counter()
        self._last_iteration = -1

    def update(self, iteration: int, **values) -> Optional[str]:
        """Record values (floats or 0-dim tensors) of iteration ``iteration`` (0-based).

        Returns the printed line when one was printed, else None.
        """
        now = time.perf_counter()
        n = max(iteration - self._last_iteration, 1)
        self.iter_time.update((now - self._last) / n, n=n)
        self._last, self._last_iteration = now, iteration
        for k, v in values.items():
            self._pending.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else v)
        if iteration % self.print_freq == 0 or iteration == self.num_iters - 1:
            self._drain()
            if self.enabled:
                line = self.format_line(iteration)
                self.print_fn(line)
                return line
        return None

    def _drain(self) -> None:
        """Convert buffered values to floats (one sync per meter) into the SmoothedValues."""
        for k, vals in self._pending.items():
            meter = self.meters.setdefault(k, SmoothedValue(self.window_size))
            tensors = [v for v in vals if isinstance(v, torch.Tensor)]
            if tensors:
                device = tensors[0].device
                vals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                                    for v in vals]).tolist()
            for v in vals:
                meter.update(float(v))
        self._pending.clear()

    def format_line(self, iteration: int) -> str:
        width = len(str(self.num_iters))
        remaining = max(self.num_iters - iteration - 1, 0)
        eta = datetime.timedelta(seconds=int(self.iter_time.global_avg * remaining))
        parts = [f"{self.header} [{iteration + 1:>{width}}/{self.num_iters}] eta {eta}".lstrip()]
        for k, m in self.meters.items():
            if _is_lr(k):
                parts.append(f"{k} {m.value:.3e}")
            else:
                parts.append(f"{k} {m.median:.4f} ({m.global_avg:.4f})")
        parts.append(f"time {self.iter_time.median:.3f}s ({self.iter_time.global_avg:.3f}s)")
        return " ".join(parts)

    def averages(self, sync: bool = True) -> Dict[str, float]:
        """Global average of every value (and 'time': seconds per iteration) over the epoch; with
        ``sync`` the averages are over all ranks (every rank must call then). Learning rates give
        their last value."""
        self._drain()
        out = {}
        for k, m in self.meters.items():
            if _is_lr(k):
                out[k] = m.value
            else:
                out[k] = m.global_avg_over_ranks() if sync else m.global_avg
        out.setdefault("time", self.iter_time.global_avg)
        return out
