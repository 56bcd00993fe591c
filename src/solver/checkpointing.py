"""The trainer's checkpoints: what a resume needs, writing it, reading it back, tuning weights.

A training checkpoint holds model, EMA, optimizer, scheduler, scaler, epoch, step, best metric, non-finite
skip count, config and the RNG states of every rank, only as tensors and plain containers, so it loads with
``weights_only=True``. ``-r`` resumes it exactly; ``-t`` only takes the weights whose shapes match.
"""
from __future__ import annotations

import json
import os
import pickle

from src.data.classes import ClassList
from src.misc import dist
from src.misc.checkpoint import (copy_checkpoint, describe_mismatch, load_checkpoint, load_pretrained,
                                 save_checkpoint)
from src.misc.rng import get_rng_state, seed_everything, set_rng_state
from src.solver.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint given with -r / -t cannot be used: missing, refused by the safe loader, wrong kind,
    or not matching the model built from the config. The message says which and how to fix it."""


def checkpoint_error(path: str, flag: str, e: BaseException) -> CheckpointError:
    if isinstance(e, pickle.UnpicklingError):
        return CheckpointError(
            f"{path} ({flag}) was refused by the safe loader: it holds pickled Python objects besides tensors "
            f"and plain containers, and loading it could run code from the file. If you made this file or "
            f"trust its source, add --trust-checkpoint (Trainer(trusted_checkpoint=True)) to load it with full "
            f"unpickling; otherwise re-save its weights with a trusted tool. Loader said: {str(e).splitlines()[0]}")
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{path} ({flag}): file not found; check the path")
    return CheckpointError(f"{path} ({flag}): {type(e).__name__}: {e}")


def load_tuning_weights(model, path: str, trusted: bool):
    try:
        report = load_pretrained(model, path, trusted=trusted)
    except (pickle.UnpicklingError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
        raise checkpoint_error(path, "-t (tune)", e) from e
    if dist.is_main_process():
        print(f"[tune] {path}:\n{report}")


def checkpoint_dict(state: TrainState, epoch: int, config: dict, classes: ClassList | None,
                    rng_per_rank: list | None = None) -> dict:
    """Everything a resume needs; only tensors and plain containers (loads with weights_only=True)."""
    rng = get_rng_state()
    return {
        **state.state_dict(),
        "epoch": epoch,
        "config": json.loads(json.dumps(config, default=str)),  # plain types only (safe load)
        "classes": classes.to_records() if classes is not None else None,  # label -> name, category id
        "rng": rng,
        "rng_per_rank": rng_per_rank if rng_per_rank is not None else [rng],
    }


def save_training_checkpoint(state: TrainState, path: str, epoch: int, config: dict, classes: ClassList | None,
                             distributed: bool, is_main: bool, copy_to: str | None = None):
    """Atomically write a checkpoint on rank 0 (every rank must call: the RNG states are gathered); ``copy_to``:
    a second file with the same content (a new best.pth is also the new last.pth), copied, not re-serialised."""
    rng_per_rank = dist.all_gather_object(get_rng_state()) if distributed else None
    if is_main:
        save_checkpoint(checkpoint_dict(state, epoch, config, classes, rng_per_rank), path)
        if copy_to is not None:
            copy_checkpoint(path, copy_to)
    if "last.pth" in (os.path.basename(path), os.path.basename(copy_to or "")):
        state.last_saved_epoch = epoch


def load_training_checkpoint(state: TrainState, path: str, trusted: bool, classes: ClassList | None, seed: int,
                             deterministic: bool, test_only: bool, is_main: bool) -> ClassList | None:
    """Resume ``state`` from the checkpoint at ``path`` (model, EMA, optimizer, scheduler, scaler, counters,
    ``epoch`` = the next epoch, RNG); returns the checkpoint's classes (else ``classes``). Raises
    CheckpointError saying what does not match and how to go on."""
    try:
        ckpt = load_checkpoint(path, trusted=trusted)
    except (pickle.UnpicklingError, FileNotFoundError) as e:
        raise checkpoint_error(path, "-r (resume)", e) from e
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
        raise CheckpointError(f"{path} is a weights file, not a training checkpoint (no optimizer state): "
                              f"use -t {path} to start a new run from its weights")
    details = describe_mismatch(state.module.state_dict(), ckpt["model"]) if isinstance(ckpt.get("model"), dict) else ""
    if details:
        raise CheckpointError(f"{path} (-r): does not match the model built from the config:\n{details}\nResume "
                              f"with the config that wrote it, or start a new run from these weights with -t {path} "
                              f"(tensors of another shape are then re-initialised, e.g. for another num_classes)")
    try:
        state.load_state_dict(ckpt)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} (-r): does not match the run built from the config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]}). Resume with the config that wrote it, or start a new "
                              f"run from its weights with -t {path}") from e
    if ckpt.get("classes"):
        stored = ClassList.from_records(ckpt["classes"])
        if classes is not None and classes.names != stored.names:
            raise CheckpointError(f"{path} (-r) was trained on the classes {list(stored.names)} (label order) but the "
                                  f"training json of the config has {list(classes.names)}: resume with the json it "
                                  f"was trained on, or start a new run from its weights with -t {path}")
        classes = stored
    load_scaler_state(state.scaler, ckpt.get("scaler") or {}, path, is_main)
    state.epoch = int(ckpt["epoch"]) + 1
    state.last_saved_epoch = int(ckpt["epoch"])
    restore_rng(ckpt, path, seed, deterministic, is_main)
    if is_main:
        print(f"[resume] {path}: evaluating the weights of epoch {state.epoch - 1}" if test_only else
              f"[resume] {path}: continuing at epoch {state.epoch}, step {state.step}")
    return classes


def load_scaler_state(scaler, state: dict, path: str, is_main: bool):
    """The GradScaler across AMP on/off: a checkpoint written without float16 AMP (every CPU run before, any
    bfloat16 or fp32 run) holds an empty scaler state; resuming it with float16 AMP starts a fresh scaler at
    ``amp_init_scale``. A float16 AMP checkpoint resumed without a scaler drops its scale. Both say so."""
    if scaler.is_enabled() and state:
        try:
            scaler.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} (-r): its GradScaler state cannot be loaded ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}); resume without --use-amp, or start a new run "
                                  f"from its weights with -t {path}") from e
    elif scaler.is_enabled() and is_main:
        print(f"[resume] {path} was written without float16 AMP (no GradScaler state): a fresh scaler starts "
              f"at amp_init_scale = {scaler.get_scale():g}")
    elif state and is_main:
        print(f"[resume] {path} was written with float16 AMP (loss scale {float(state.get('scale', 0)):g}); this "
              f"run has no GradScaler (use_amp off or amp_dtype bfloat16): the scaler state is not used")


def restore_rng(ckpt: dict, path: str, seed: int, deterministic: bool, is_main: bool):
    """Each rank continues its own RNG streams; with another number of processes they are re-seeded."""
    per_rank = ckpt.get("rng_per_rank") or ([ckpt["rng"]] if ckpt.get("rng") is not None else [])
    world, rank = dist.get_world_size(), dist.get_rank()
    if len(per_rank) == world:
        set_rng_state(per_rank[rank])
        return
    seed_everything(seed + rank + 1_000_003 * (int(ckpt["epoch"]) + 1), deterministic=deterministic)
    if is_main:
        print(f"[resume] {path} holds RNG states of {len(per_rank)} process(es), this run has {world}: "
              f"the random streams are re-seeded (the run continues correctly but not bit-identically)")
