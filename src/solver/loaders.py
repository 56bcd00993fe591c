"""Data loaders of the trainer and the startup checks of a run (loaders, model and criterion agree)."""
from __future__ import annotations

import math
import os
from typing import List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from src.core.yaml_utils import ConfigError
from src.data.epoch_sync import EpochIndex
from src.misc import dist
from src.misc.rng import rng_preserved


def loader_seed(seed: int, epoch: int, rank: int, train: bool = True) -> int:
    """Seed of a data loader's generator for one epoch (>= 0) on one rank; its worker seeds derive from it."""
    entropy = [seed % 2**63, epoch, rank, int(train)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def largest_stride(model: nn.Module) -> int:
    """Largest feature stride of the model (the largest ``feat_strides`` entry of any submodule; 32 for R18)."""
    strides = [int(s) for m in model.modules() for s in (getattr(m, "feat_strides", None) or [])]
    return max(strides) if strides else 1


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of `world` gets the indices r, r + world, r + 2 world, ... < n: every index exactly once over the
    ranks, without DistributedSampler's padding (which repeats images so that the shards are equal, and so
    counts them twice in sums such as DSET's keep-bias figures). The shards differ by at most one image; the
    evaluation loop has no collective, so ranks may run different numbers of batches."""

    def __init__(self, n: int, world: int, rank: int):
        self.n, self.world, self.rank = int(n), int(world), int(rank)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class EpochSampler(torch.utils.data.Sampler):
    """The training sampler's indices as ``EpochIndex(index, epoch, seed)``: the epoch and the workers' seed
    of the epoch (``loader_seed(seed, epoch, rank)``) travel to the loader workers with every index, so
    persistent workers switch epoch policies and reseed exactly as fresh ones do (src/data/epoch_sync.py)."""

    def __init__(self, sampler: DistributedSampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank = sampler, int(seed), int(rank)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes = int(epoch), 0
        self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        # a second pass over the same epoch (not done by the trainer) re-seeds too, as fresh workers would
        epoch, seed = self.epoch, loader_seed(self.seed, self.epoch, self.rank, train=True) + self.passes
        self.passes += 1
        return (EpochIndex(int(i), epoch, seed) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def build_loader(cfg, key: str, train: bool, seed: int, device: torch.device) -> DataLoader:
    """The loader of section ``key``; ``pin_memory`` defaults to true on CUDA (page-locked batches make the
    trainer's ``non_blocking`` copies asynchronous) and false on CPU (nothing to copy); ``persistent_workers``
    defaults to true with workers (the training loader's epoch reaches them with every index: EpochSampler)."""
    section = cfg[key]
    ds_spec = section.get("dataset")
    if ds_spec is None:
        raise ConfigError(f"{cfg.where((key,))}: missing 'dataset'")
    dataset = cfg.build_spec(ds_spec, (key, "dataset"))
    collate = cfg.build_spec(section["collate_fn"], (key, "collate_fn")) if "collate_fn" in section else None
    world = dist.get_world_size()
    total_bs = int(section.get("total_batch_size", 1))
    if total_bs % world != 0:
        raise ConfigError(f"{cfg.where((key, 'total_batch_size'))}: {total_bs} is not divisible by "
                          f"the number of processes ({world})")
    # the order comes from the sampler (seed + set_epoch); training workers are re-seeded per epoch from
    # (seed, epoch, rank) by EpochSampler / sync_epoch, so worker augmentations never depend on the global RNGs
    if train:
        sampler = EpochSampler(DistributedSampler(dataset, num_replicas=world, rank=dist.get_rank(),
                                                  shuffle=bool(section.get("shuffle", train)), seed=seed,
                                                  drop_last=False), seed, dist.get_rank())
        if collate is not None and hasattr(collate, "set_epoch"):
            dataset.epoch_listeners = (collate,)  # the worker's collate copy follows the worker's dataset
    else:  # evaluation: every image exactly once over the ranks (DistributedSampler would repeat some)
        sampler = ShardSampler(len(dataset), world, dist.get_rank())
    generator = torch.Generator().manual_seed(loader_seed(seed, 0, dist.get_rank(), train))
    workers = int(section.get("num_workers", 0))
    persistent = section.get("persistent_workers")
    if persistent is not None and not isinstance(persistent, bool):
        raise ConfigError(f"{cfg.where((key, 'persistent_workers'))} = {persistent!r} is invalid: must be true, "
                          f"false or null (default: true when num_workers > 0)")
    return DataLoader(dataset, batch_size=total_bs // world, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=bool(section.get("drop_last", False)),
                      pin_memory=bool(section.get("pin_memory", torch.device(device).type == "cuda")),
                      persistent_workers=workers > 0 and persistent is not False, generator=generator)


def start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Put a training loader in ``epoch``: the sampler's order and the workers' seed (a function of (seed,
    epoch, rank)), the generator, and the epoch policies of the dataset and collate function (main
    process; workers follow with the first index of the epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader_seed(seed, epoch, dist.get_rank(), train=True))
    for obj in (loader.dataset, loader.collate_fn):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def check_num_classes(cfg, loaders):
    num_classes = cfg.get("num_classes")
    for loader in loaders:
        if loader is None:
            continue
        ds_classes = len(getattr(loader.dataset, "category_names", []) or [])
        if num_classes is not None and ds_classes > num_classes:
            raise ConfigError(f"num_classes = {num_classes} but the dataset "
                              f"{getattr(loader.dataset, 'ann_file', '')} has {ds_classes} categories: "
                              f"set num_classes >= {ds_classes}")


def training_classes(train_loader):
    """The class list the training json defines (None without a training set); a resumed checkpoint's
    stored list must agree with it (checkpointing.py)."""
    return getattr(train_loader.dataset, "classes", None) if train_loader is not None else None


def prepare_val_data(val_loader, classes, train_loader=None, is_main: bool = True):
    """Label the val json with the training `classes`, matched by name (src/data/classes.py), and warn
    about images shared with the training set. Returns the class list in use (the val json's own, with a
    warning, when there is no training list)."""
    dataset = val_loader.dataset if val_loader is not None else None
    if dataset is None or not hasattr(dataset, "use_classes"):
        return classes
    check_leakage(train_loader, val_loader)
    if classes is None:
        if is_main:
            print(f"warning: no training class list (no train_dataloader, and the checkpoint stores none): the "
                  f"categories of {dataset.ann_file!r} are taken as the model's classes in id order")
        classes = dataset.classes
    dataset.use_classes(classes)
    return classes


def check_training_data(cfg, train_loader) -> None:
    """Refuse, before the first step, a training set that would train on nothing: an unlabelled set, fewer
    images than one batch with ``drop_last`` (0 steps per epoch), or no usable box at all."""
    if train_loader is None:
        return
    dataset = train_loader.dataset
    where = cfg.where(("train_dataloader",))
    name = getattr(dataset, "ann_file", "the dataset")
    if not getattr(dataset, "labelled", True):
        raise ConfigError(f"{where}: {name} has no annotations (allow_unlabelled: true): an unlabelled set cannot "
                          f"be trained on")
    if len(train_loader) == 0:
        raise ConfigError(f"{where}: the training set has {len(train_loader.sampler)} image(s) per process, fewer "
                          f"than one batch of {train_loader.batch_size} with drop_last: true, so an epoch would "
                          f"have no step. Lower total_batch_size or set drop_last: false")
    stats = getattr(dataset, "box_stats", None)
    if stats is not None and stats.get("kept", 1) == 0:
        raise ConfigError(f"{where}: {name} has no usable box (box_stats {stats}): training would learn nothing")
    check_boxes_survive_transforms(dataset, where)


def check_boxes_survive_transforms(dataset, where: str, sample: int = 8) -> None:
    """Run the training transforms on up to `sample` images that have boxes (evenly spread, a fixed choice):
    if every one of them loses all its boxes, training would run on empty targets. An error naming the
    images, before the first step."""
    if not hasattr(dataset, "boxes_per_image") or getattr(dataset, "transforms", None) is None:
        return
    counts = dataset.boxes_per_image()
    with_boxes = np.flatnonzero(counts > 0)
    if len(with_boxes) == 0:
        return
    picked = with_boxes[np.linspace(0, len(with_boxes) - 1, min(sample, len(with_boxes))).round().astype(int)]
    picked = sorted(set(picked.tolist()))
    lost = []
    for i in picked:
        before = int(counts[i])
        with rng_preserved():   # random transforms must not change the run's random stream
            after = len(dataset[i][1]["boxes"])
        if after > 0:
            return
        lost.append(f"image id {dataset.image_ids[i]}: {before} boxes before the transforms, 0 after")
    raise ConfigError(f"{where}: the training transforms remove every box of the {len(picked)} images checked "
                      f"(" + "; ".join(lost[:3]) + "): training would run on empty targets. Check the box "
                      f"convention of {getattr(dataset, 'ann_file', 'the json')} (COCO bbox is [x, y, width, "
                      f"height] in pixels) and the transforms (Resize / crop sizes, SanitizeBoundingBoxes min_size)")


def check_leakage(train_loader, val_loader, show: int = 3) -> List[str]:
    """Image files that are in both the training and the validation set (by resolved path): a warning with
    the count and the first names (the val AP would then measure memorisation). Returns the shared paths."""
    if train_loader is None or val_loader is None:
        return []
    paths = []
    for loader in (train_loader, val_loader):
        ds = loader.dataset
        if not hasattr(ds, "image_path"):
            return []
        paths.append({os.path.realpath(ds.image_path(i)) for i in range(len(ds))})
    shared = sorted(paths[0] & paths[1])
    if shared and dist.is_main_process():
        names = ", ".join(os.path.basename(p) for p in shared[:show])
        print(f"warning: {len(shared)} image file(s) are in both the training and the validation set (e.g. {names}); "
              f"the val AP of these images measures memorisation, not generalisation. Use disjoint splits")
    return shared


def check_input_divisibility(cfg, loaders: dict, max_stride: int):
    """Inputs are padded by the collate to a multiple of ``size_divisibility``; the encoder's top-down path
    needs every side to be a multiple of the largest stride, so check the setting at startup (an input
    smaller than the stride, e.g. 16x16, is then padded to one stride and works)."""
    for key, loader in loaders.items():
        div = getattr(loader.collate_fn, "size_divisibility", None) if loader is not None else None
        if div is not None and div % max_stride != 0:
            raise ConfigError(f"{cfg.where((key, 'collate_fn', 'size_divisibility'))}: {div} is not a "
                              f"multiple of the model's largest stride {max_stride}; padded inputs would "
                              f"give feature maps the encoder cannot fuse. Set it to {max_stride} "
                              f"(or a multiple)")


def check_loss_weights(cfg, criterion):
    """Every loss weight finite and >= 0; a criterion wrapping another (DSETCriterion's ``base``) is checked
    inner first, so the error names the section that set the weight (e.g. RTDETRCriterionv2.weight_dict)."""
    for module in reversed(list(criterion.modules())):
        name = type(module).__name__
        for k, w in (getattr(module, "weight_dict", None) or {}).items():
            if not (math.isfinite(float(w)) and float(w) >= 0):
                raise ConfigError(f"{cfg.where((name, 'weight_dict', k))}: loss weight {k} = {w} must be a "
                                  f"finite number >= 0")


def multiscale(train_loader) -> bool:
    """Whether training draws input sizes per batch (``collate_fn.scales``): cuDNN autotuning then re-times."""
    return train_loader is not None and getattr(train_loader.collate_fn, "scales", None) is not None


def iters_per_epoch(cfg, train_loader) -> int:
    """Iterations per epoch: the loader's length, capped by ``max_iters_per_epoch``; 1 without a loader."""
    if train_loader is None:
        return 1
    n = len(train_loader)
    cap = cfg.get("max_iters_per_epoch")
    return max(1, min(n, int(cap)) if cap else n)
