"""Checkpoint IO: atomic saving, safe loading, and shape-matched weight transfer for tuning.

* ``save_checkpoint`` writes to a temporary file in the target directory, fsyncs it and renames
  it over the target with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves the
  previous checkpoint intact.
* ``load_checkpoint`` uses ``torch.load(weights_only=True)``: only tensors and plain
  containers/numbers/strings are accepted, so a file cannot run code. ``trusted=True`` is an
  explicit opt-in for legacy fully-pickled files and CAN EXECUTE ARBITRARY CODE from the file.
* ``extract_state_dict`` finds the weights in the official checkpoint layouts.
* ``load_matching_weights`` implements tuning (``-t``): load every tensor whose key and shape
  match, leave the rest at initialisation, report everything.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from src.misc.dist import is_main_process

__all__ = ["save_checkpoint", "load_checkpoint", "extract_state_dict", "load_matching_weights",
           "LoadReport", "StateDictAdapter", "NotACheckpointError", "check_checkpoint_file",
           "describe_mismatch"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTOCOL_OPCODE = b"\x80"  # the legacy format: a pickle (protocol >= 2) of the tensors' metadata


class NotACheckpointError(ValueError):
    """The file is not something torch.save wrote, or it is truncated: no loader option can read it."""

# (checkpoint_state_dict, model_state_dict) -> (new_checkpoint_state_dict, messages)
StateDictAdapter = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor]],
                            Tuple[Dict[str, torch.Tensor], List[str]]]


def _write_atomically(path: str | os.PathLike, write: Callable) -> None:
    """``write(f)`` into a temporary file next to ``path``, fsync, rename over ``path`` (parent directories are
    created): a reader sees the old file or the new one, never a part."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # persist the rename itself (best effort; not supported on every filesystem)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(obj, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path`` (parent directories are created)."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomically copy the checkpoint file ``src`` to ``dst`` (a new best written once, then copied to
    last.pth: one serialisation and one device-to-host transfer instead of two)."""
    def copy(f):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, f, length=16 << 20)

    _write_atomically(dst, copy)


def load_checkpoint(path: str | os.PathLike, trusted: bool = False, map_location="cpu"):
    """Load a checkpoint saved with ``torch.save``.

    Args:
        path: checkpoint file.
        trusted: False (default) loads with ``weights_only=True`` (tensors and plain Python
            containers only; safe). True loads with full unpickling, which CAN RUN ARBITRARY
            CODE embedded in the file: use only for files you produced or fully trust.
        map_location: passed to ``torch.load`` (default 'cpu').
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except (EOFError, RuntimeError) as e:
        if isinstance(e, EOFError) or "zip archive" in str(e):
            raise NotACheckpointError(f"{path}: truncated or damaged PyTorch checkpoint ({str(e).splitlines()[0]}); "
                                      f"copy it again or use another checkpoint") from e
        raise
    except pickle.UnpicklingError as e:
        if trusted:
            raise NotACheckpointError(f"{path}: not a readable PyTorch checkpoint ({e}); it is damaged or not a "
                                      f"checkpoint") from e
        raise pickle.UnpicklingError(
            f"{path}: refused by the safe loader (weights_only=True): it contains pickled Python "
            f"objects other than tensors and plain containers. If you trust this file, load it "
            f"with load_checkpoint(path, trusted=True) (full unpickling, can execute code from "
            f"the file). Original error: {str(e).splitlines()[0]}") from e


def add_trust_option(parser) -> None:
    """``--trust-checkpoint`` of every command that loads a checkpoint (train.py, tools/infer.py,
    tools/export_onnx.py): ``load_checkpoint(..., trusted=args.trust_checkpoint)``."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load legacy pickled checkpoints with weights_only=False; this can run code from "
                             "the file, so use it only for files you trust")


def check_checkpoint_file(path: str) -> None:
    """Raise NotACheckpointError unless ``path`` looks like a complete torch.save file (cheap: magic bytes,
    and for the zip format the central directory at the end, which a truncated copy lacks)."""
    with open(path, "rb") as f:
        head = f.read(4)
    size = os.path.getsize(path)
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise NotACheckpointError(f"{path}: truncated PyTorch checkpoint ({size} bytes, the end of the file is "
                                      f"missing): the copy or the save was interrupted; copy it again or use "
                                      f"another checkpoint (the trainer writes last.pth atomically, so the "
                                      f"previous one in output_dir is complete)")
        return
    if head[:1] == _PICKLE_PROTOCOL_OPCODE:
        return  # a legacy (pre-1.6) checkpoint; torch.load reports truncation as EOFError
    raise NotACheckpointError(f"{path}: not a PyTorch checkpoint ({size} bytes starting with {head!r}; a torch.save "
                              f"file starts with {_ZIP_MAGIC!r}); check the path. --trust-checkpoint does not "
                              f"help here: the file is not a pickle at all")


def describe_mismatch(model_sd: Dict[str, torch.Tensor], ckpt_sd: Dict[str, torch.Tensor], limit: int = 10) -> str:
    """Which tensors of a checkpoint do not fit a model: shape differences, then missing / unexpected keys."""
    shapes = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in ckpt_sd.items()
              if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    lines = []
    if shapes:
        lines.append(f"{len(shapes)} tensor(s) with another shape (checkpoint vs model):")
        lines += [f"  {k}: {list(a)} vs {list(b)}" for k, a, b in shapes[:limit]]
        if len(shapes) > limit:
            lines.append(f"  ... and {len(shapes) - limit} more")
        if any("score_head" in k or "class_embed" in k or "denoising_class_embed" in k for k, _, _ in shapes):
            lines.append("  (class-dependent layers: the checkpoint was trained with another num_classes)")
    for what, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected)):
        if keys:
            lines.append(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:limit])}"
                         + (f" ... and {len(keys) - limit} more" if len(keys) > limit else ""))
    return "\n".join(lines)


def extract_state_dict(ckpt) -> Dict[str, torch.Tensor]:
    """Model weights from a loaded checkpoint, with any DDP ``module.`` prefix stripped.

    Accepted layouts, in order of preference: ``{'ema': {'module': sd, ...}}`` (EMA weights,
    what the official RT-DETR releases evaluate with), ``{'model': sd}``, ``{'state_dict': sd}``,
    or a bare state dict (all values tensors).
    """
    if not isinstance(ckpt, dict):
        raise TypeError(f"extract_state_dict: expected a dict, got {type(ckpt).__name__}")
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        sd = ema["module"]
    elif isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise KeyError(f"extract_state_dict: no weights found; expected 'ema': {{'module': ...}}, "
                       f"'model', 'state_dict' or a bare state dict, got top-level keys "
                       f"{sorted(map(str, ckpt))[:20]}")
    prefix = "module."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


@dataclass
class LoadReport:
    """Outcome of ``load_matching_weights``.

    loaded: keys copied from the checkpoint.
    missing: model keys absent from the checkpoint (left at initialisation).
    unexpected: checkpoint keys absent from the model (ignored).
    mismatched: (key, checkpoint shape, model shape) for keys in both with different shapes
        (left at initialisation, i.e. re-initialised).
    messages: notes from the adapters.
    """
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def is_exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        total = self.num_loaded + len(self.missing) + len(self.mismatched)
        lines = [f"loaded {self.num_loaded}/{total} model tensors from the checkpoint"]
        lines += [f"  adapter: {m}" for m in self.messages]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} shape-mismatched, RE-INITIALISED (left at init):")
            lines += [f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            if any(("score_head" in k or "class_embed" in k) for k, _, _ in self.mismatched):
                lines.append("    (class-dependent layers differ: num_classes differs from the checkpoint)")
        if self.missing:
            lines.append(f"  {len(self.missing)} missing from the checkpoint (left at init): {self.missing}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected in the checkpoint (ignored): {self.unexpected}")
        return "\n".join(lines)


def load_matching_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                          adapters: Sequence[StateDictAdapter] = (), strict: bool = False,
                          verbose: bool = False) -> LoadReport:
    """Copy every checkpoint tensor whose key and shape match into ``model``.

    Args:
        model: target (unwrap DDP first, or pass ``model.module``).
        state_dict: checkpoint weights (see ``extract_state_dict``).
        adapters: callables ``(state_dict, model_state_dict) -> (new_state_dict, messages)``
            applied in order before matching (e.g. expanding dense FFN weights into experts).
        strict: raise RuntimeError listing every missing / unexpected / mismatched key instead
            of loading partially (the model is not modified then).
        verbose: also print the report on the main process (default False: the caller prints
            ``str(report)`` with its own context).

    Returns:
        A ``LoadReport``. Keys not loaded keep their current (initial) values.
    """
    model_sd = model.state_dict()
    messages: List[str] = []
    for adapter in adapters:
        state_dict, msgs = adapter(state_dict, model_sd)
        messages += list(msgs)
    report = LoadReport(messages=messages)
    to_load = {}
    for k, v in state_dict.items():
        if k not in model_sd:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(model_sd[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(model_sd[k].shape)))
        else:
            to_load[k] = v
    report.missing = [k for k in model_sd if k not in state_dict]
    report.loaded = [k for k in model_sd if k in to_load]
    if strict and not report.is_exact:
        raise RuntimeError("load_matching_weights(strict=True): checkpoint does not match the model\n"
                           + str(report))
    model.load_state_dict(to_load, strict=False)
    if verbose and is_main_process():
        print(report, flush=True)
    return report


_WEIGHT_ADAPTERS: list = []


def register_weight_adapter(adapter: Callable) -> Callable:
    """Register a state-dict adapter ``(state_dict, model_state_dict) -> (state_dict, messages)`` that
    ``load_pretrained`` applies (in registration order) before matching keys; a model family registers the
    adapters its layouts need (e.g. DSET: dense FFN -> experts) when its package is imported."""
    if adapter not in _WEIGHT_ADAPTERS:
        _WEIGHT_ADAPTERS.append(adapter)
    return adapter


def weight_adapters() -> tuple:
    """The registered state-dict adapters, in registration order."""
    return tuple(_WEIGHT_ADAPTERS)


def load_pretrained(model: nn.Module, path: str, trusted: bool = False, strict: bool = False) -> LoadReport:
    """Load weights from ``path`` (official ``{'ema': {'module': sd}}`` / ``{'model': sd}`` / bare state dict).

    ``strict=True``: every key and shape must match (the plain detector with the official checkpoint).
    Otherwise the state-dict adapters the model families registered (``register_weight_adapter`` below,
    e.g. one AIFI layer to every attended level, dense FFN to experts) are applied, every matching tensor
    loads and the rest stays at its initialisation (reported).
    """
    state = extract_state_dict(load_checkpoint(path, trusted=trusted))
    return load_matching_weights(model, state, adapters=() if strict else weight_adapters(), strict=strict)
