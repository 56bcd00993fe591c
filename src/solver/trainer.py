"""The training loop: read it top to bottom.

Trainer(cfg, args).fit() trains and evaluates; .evaluate_only() runs one evaluation. Everything the loop
needs is built in ``_setup``; checkpoints hold the full state (model, EMA, optimizer, scheduler, scaler,
epoch, step, best metric, non-finite skip count, config, RNG states of every rank) so ``-r last.pth``
continues exactly where it stopped: on CPU a run killed mid-epoch and resumed ends with bit-identical
weights (tests/test_reliability.py). The protections are described in docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import time
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from src.core.config import YAMLConfig
from src.core.yaml_utils import ConfigError
from src.misc import dist
from src.misc.checkpoint import load_checkpoint, save_checkpoint
from src.misc.logger import ProgressMeter, TrainLogger
from src.misc.rng import get_rng_state, seed_everything, set_rng_state
from src.optim.ema import ModelEMA
from src.optim.lr_scheduler import build_lr_scheduler
from src.optim.optimizer import build_optimizer, check_param_groups
from src.solver.evaluator import CocoEvaluator, format_table
from src.zoo.rtdetr import dset_losses as dl
from src.zoo.rtdetr.weights import load_pretrained


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term (or the gradient norm) is NaN/inf and no more skips are allowed."""


class CheckpointError(RuntimeError):
    """A checkpoint given with -r / -t cannot be used: missing, refused by the safe loader, wrong kind,
    or not matching the model built from the config. The message says which and how to fix it."""


@contextlib.contextmanager
def rng_preserved():
    """Run a block (evaluation) without moving the python / numpy / torch generators of training, so a
    resumed run (whose checkpoint holds the RNG state of the end of training) continues the same stream."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def loader_seed(seed: int, epoch: int, rank: int, train: bool = True) -> int:
    """Seed of a data loader's generator for one epoch (>= 0) on one rank; its worker seeds derive from it."""
    entropy = [seed % 2**63, epoch, rank, int(train)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def largest_stride(model: nn.Module) -> int:
    """Largest feature stride of the model (the largest ``feat_strides`` entry of any submodule; 32 for R18)."""
    strides = [int(s) for m in model.modules() for s in (getattr(m, "feat_strides", None) or [])]
    return max(strides) if strides else 1


def may_skip_parameters(cfg) -> List[str]:
    """Reasons why some parameters can get no gradient in a step (DDP then needs find_unused_parameters).

    The plain detector keeps every parameter in the graph (the decoder adds the denoising embedding with a
    zero weight when a batch has no box; the experts of a MoE layer are one stacked parameter). DSET's token
    pruner is bypassed during ``token_pruning_warmup_epochs`` and its scorer then gets a gradient only through
    CASS, so with DSET on some steps leave it unused.
    """
    return ["DSET token pruner (no gradient while pruning warms up or without CASS / straight-through gate)"] \
        if cfg.dset is not None else []


def set_epoch_everywhere(model: nn.Module, epoch: int):
    """Tell epoch-dependent modules (pruner warmup) the epoch."""
    for m in dist.unwrap_model(model).modules():
        if m is not model and hasattr(m, "set_epoch") and callable(m.set_epoch):
            m.set_epoch(epoch)


def eval_scale_sizes(targets: List[dict], padded_hw) -> torch.Tensor:
    """Size of the padded canvas in ORIGINAL image pixels, per image: [B, 2] as (w, h).

    Boxes come out normalised to the padded input; multiplying by this maps them to original pixels:
    ``padded * orig / resized`` per axis (``orig_size`` and ``size`` are (w, h) per target).
    """
    ph, pw = padded_hw
    orig = torch.stack([t["orig_size"] for t in targets]).float()
    resized = torch.stack([t["size"] for t in targets]).float()
    return orig * orig.new_tensor([pw, ph]) / resized


class Trainer:
    def __init__(self, cfg: YAMLConfig, device: str = "cpu", output_dir: str | None = None,
                 seed: int | None = None, use_amp: bool | None = None, resume: str | None = None,
                 tuning: str | None = None, trusted_checkpoint: bool = False):
        self.cfg = cfg
        self.distributed = dist.init_distributed(device)
        if self.distributed and str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device)
        self.output_dir = output_dir or cfg.get("output_dir", "./output/run")
        self.seed = cfg.get("seed", 0) if seed is None else seed
        self.use_amp = bool(cfg.get("use_amp", False) if use_amp is None else use_amp) and self.device.type == "cuda"
        self.resume_path = resume
        self.tuning_path = tuning or cfg.get("tuning")
        self.trusted = trusted_checkpoint
        self.epochs = int(cfg.get("epochs", 1))
        self.print_freq = int(cfg.get("print_freq", 50))
        self.dset = cfg.dset
        self.last_saved_epoch = None  # epoch of the newest last.pth written (or resumed from) by this run
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        seed_everything(self.seed + dist.get_rank(), deterministic=bool(cfg.get("deterministic", False)))
        self.is_main = dist.is_main_process()
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)

        model = self._build("model", lambda: cfg.model)
        self.max_stride = largest_stride(model)
        if self.tuning_path:
            self._load_tuning_weights(model, self.tuning_path)
        if self.distributed and cfg.get("sync_bn", False) and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.criterion = self._build("criterion", lambda: cfg.criterion).to(self.device)
        self._check_loss_weights()
        self.postprocessor = self._build("postprocessor", lambda: cfg.postprocessor).to(self.device)

        self.train_loader = self._build_loader("train_dataloader", train=True) if "train_dataloader" in cfg else None
        self.val_loader = self._build_loader("val_dataloader", train=False) if "val_dataloader" in cfg else None
        self._check_num_classes()
        self._check_input_divisibility()

        self.optimizer = build_optimizer(self.model, cfg.get("optimizer", {"type": "AdamW", "lr": 1e-4}))
        check_param_groups(self.model, self.optimizer)
        self.iters_per_epoch = self._iters_per_epoch()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.get("lr_scheduler"),
                                               cfg.get("lr_warmup_scheduler"), self.iters_per_epoch, self.epochs)
        self.ema = ModelEMA(self.model, **cfg.get("ema", {})) if cfg.get("use_ema", False) else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

        if self.distributed:
            find_unused = bool(cfg.get("find_unused_parameters", False))
            reasons = may_skip_parameters(cfg)
            if reasons and not find_unused:
                find_unused = True  # without it DDP fails at the step after one where a parameter got no grad
                if self.is_main:
                    print(f"[ddp] find_unused_parameters enabled: parameters can get no gradient in a step "
                          f"({'; '.join(reasons)})")
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused)

        self.logger = TrainLogger(self.output_dir, enabled=self.is_main)
        self.start_epoch, self.global_step, self.best_ap = 0, 0, -1.0
        self.nonfinite_skipped = 0
        if self.resume_path:
            self.load_state(self.resume_path)

    def _build(self, key: str, build):
        """Build a component; a RuntimeError from its constructor (e.g. a negative size such as a negative
        ``expansion``) is a config problem: report it as a ConfigError naming the component's section."""
        try:
            return build()
        except RuntimeError as e:
            name = self.cfg.get(key)
            raise ConfigError(f"{self.cfg.where((name,))}: building {key} {name} failed: {e}. Check the sizes in "
                              f"the {name} section and its sub-components") from e

    def _check_loss_weights(self):
        name = self.cfg.get("criterion")
        for k, w in (getattr(self.criterion, "weight_dict", None) or {}).items():
            if not (math.isfinite(float(w)) and float(w) >= 0):
                raise ConfigError(f"{self.cfg.where((name, 'weight_dict', k))}: loss weight {k} = {w} must be a "
                                  f"finite number >= 0")

    def _load_tuning_weights(self, model: nn.Module, path: str):
        try:
            report = load_pretrained(model, path, trusted=self.trusted)
        except (pickle.UnpicklingError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
            raise self._checkpoint_error(path, "-t (tune)", e) from e
        if dist.is_main_process():
            print(f"[tune] {path}:\n{report}")

    @staticmethod
    def _checkpoint_error(path: str, flag: str, e: BaseException) -> CheckpointError:
        if isinstance(e, pickle.UnpicklingError):
            return CheckpointError(
                f"{path} ({flag}) was refused by the safe loader: it holds pickled Python objects besides tensors "
                f"and plain containers, and loading it could run code from the file. If you made this file or "
                f"trust its source, add --trust-checkpoint (Trainer(trusted_checkpoint=True)) to load it with full "
                f"unpickling; otherwise re-save its weights with a trusted tool. Loader said: {str(e).splitlines()[0]}")
        if isinstance(e, FileNotFoundError):
            return CheckpointError(f"{path} ({flag}): file not found; check the path")
        return CheckpointError(f"{path} ({flag}): {type(e).__name__}: {e}")

    def _build_loader(self, key: str, train: bool) -> DataLoader:
        section = self.cfg[key]
        ds_spec = section.get("dataset")
        if ds_spec is None:
            raise ConfigError(f"{self.cfg.where((key,))}: missing 'dataset'")
        dataset = self.cfg.build_spec(ds_spec, (key, "dataset"))
        collate = self.cfg.build_spec(section["collate_fn"], (key, "collate_fn")) if "collate_fn" in section else None
        world = dist.get_world_size()
        total_bs = int(section.get("total_batch_size", 1))
        if total_bs % world != 0:
            raise ConfigError(f"{self.cfg.where((key, 'total_batch_size'))}: {total_bs} is not divisible by "
                              f"the number of processes ({world})")
        # the order comes from the sampler (seed + set_epoch); the generator seeds the loader workers and is
        # re-seeded every epoch from (seed, epoch, rank), so worker augmentations never depend on the global RNGs
        sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.get_rank(),
                                     shuffle=bool(section.get("shuffle", train)), seed=self.seed,
                                     drop_last=False)
        generator = torch.Generator().manual_seed(loader_seed(self.seed, 0, dist.get_rank(), train))
        return DataLoader(dataset, batch_size=total_bs // world, sampler=sampler,
                          num_workers=int(section.get("num_workers", 0)), collate_fn=collate,
                          drop_last=bool(section.get("drop_last", False)),
                          pin_memory=bool(section.get("pin_memory", False)),
                          persistent_workers=False, generator=generator)

    def _check_num_classes(self):
        num_classes = self.cfg.get("num_classes")
        for loader in (self.train_loader, self.val_loader):
            if loader is None:
                continue
            ds_classes = len(getattr(loader.dataset, "category_names", []) or [])
            if num_classes is not None and ds_classes > num_classes:
                raise ConfigError(f"num_classes = {num_classes} but the dataset "
                                  f"{getattr(loader.dataset, 'ann_file', '')} has {ds_classes} categories: "
                                  f"set num_classes >= {ds_classes}")

    def _check_input_divisibility(self):
        """Inputs are padded by the collate to a multiple of ``size_divisibility``; the encoder's top-down path
        needs every side to be a multiple of the largest stride, so check the setting at startup (an input
        smaller than the stride, e.g. 16x16, is then padded to one stride and works)."""
        for key, loader in (("train_dataloader", self.train_loader), ("val_dataloader", self.val_loader)):
            div = getattr(loader.collate_fn, "size_divisibility", None) if loader is not None else None
            if div is not None and div % self.max_stride != 0:
                raise ConfigError(f"{self.cfg.where((key, 'collate_fn', 'size_divisibility'))}: {div} is not a "
                                  f"multiple of the model's largest stride {self.max_stride}; padded inputs would "
                                  f"give feature maps the encoder cannot fuse. Set it to {self.max_stride} "
                                  f"(or a multiple)")

    def _iters_per_epoch(self) -> int:
        if self.train_loader is None:
            return 1
        n = len(self.train_loader)
        cap = self.cfg.get("max_iters_per_epoch")
        return max(1, min(n, int(cap)) if cap else n)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, rng_per_rank: list | None = None) -> dict:
        """Everything a resume needs; only tensors and plain containers (loads with weights_only=True)."""
        rng = get_rng_state()
        return {
            "model": dist.unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.global_step,
            "best_ap": self.best_ap,
            "nonfinite_skipped": self.nonfinite_skipped,
            "config": json.loads(json.dumps(self.cfg.yaml_cfg, default=str)),  # plain types only (safe load)
            "rng": rng,
            "rng_per_rank": rng_per_rank if rng_per_rank is not None else [rng],
        }

    def load_state(self, path: str):
        try:
            ckpt = load_checkpoint(path, trusted=self.trusted)
        except (pickle.UnpicklingError, FileNotFoundError) as e:
            raise self._checkpoint_error(path, "-r (resume)", e) from e
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
            raise CheckpointError(f"{path} is a weights file, not a training checkpoint (no optimizer state): "
                                  f"use -t {path} to start a new run from its weights")
        try:
            dist.unwrap_model(self.model).load_state_dict(ckpt["model"])
            if self.ema and ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} (-r): does not match the run built from the config ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}). Resume with the config that wrote it, or start a new "
                                  f"run from its weights with -t {path}") from e
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["step"])
        self.best_ap = float(ckpt["best_ap"])
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        self.last_saved_epoch = int(ckpt["epoch"])
        self._restore_rng(ckpt, path)
        if self.is_main:
            print(f"[resume] {path}: continuing at epoch {self.start_epoch}, step {self.global_step}")

    def _restore_rng(self, ckpt: dict, path: str):
        """Each rank continues its own RNG streams; with another number of processes they are re-seeded."""
        per_rank = ckpt.get("rng_per_rank") or ([ckpt["rng"]] if ckpt.get("rng") is not None else [])
        world, rank = dist.get_world_size(), dist.get_rank()
        if len(per_rank) == world:
            set_rng_state(per_rank[rank])
            return
        seed_everything(self.seed + rank + 1_000_003 * (int(ckpt["epoch"]) + 1),
                        deterministic=bool(self.cfg.get("deterministic", False)))
        if self.is_main:
            print(f"[resume] {path} holds RNG states of {len(per_rank)} process(es), this run has {world}: "
                  f"the random streams are re-seeded (the run continues correctly but not bit-identically)")

    def save(self, name: str, epoch: int):
        """Atomically write a checkpoint on rank 0 (every rank must call: the RNG states are gathered)."""
        rng_per_rank = dist.all_gather_object(get_rng_state()) if self.distributed else None
        if self.is_main:
            save_checkpoint(self.state_dict(epoch, rng_per_rank), os.path.join(self.output_dir, name))
        if name == "last.pth":
            self.last_saved_epoch = epoch

    # ------------------------------------------------------------------ training
    def fit(self):
        if self.start_epoch >= self.epochs and self.is_main:
            print(f"[fit] nothing to do: the checkpoint finished epoch {self.start_epoch - 1} of {self.epochs}")
        try:
            for epoch in range(self.start_epoch, self.epochs):
                train_stats = self.train_one_epoch(epoch)
                record = {"epoch": epoch, "step": self.global_step, "train": train_stats}
                # the RNG state saved here is where the next epoch starts; evaluation below must not move it
                self.save("last.pth", epoch)
                freq = int(self.cfg.get("checkpoint_freq", 0) or 0)
                if freq and (epoch + 1) % freq == 0:
                    self.save(f"checkpoint{epoch:04d}.pth", epoch)
                eval_freq = int(self.cfg.get("eval_freq", 1) or 1)
                if self.val_loader is not None and ((epoch + 1) % eval_freq == 0 or epoch == self.epochs - 1):
                    with rng_preserved():
                        stats = self.evaluate(epoch)
                    record["eval"] = {k: v for k, v in stats.items() if k != "per_class"}
                    if stats["AP"] > self.best_ap:
                        self.best_ap = stats["AP"]
                        self.save("last.pth", epoch)
                        self.save("best.pth", epoch)
                self.logger.epoch_record(record)
        finally:
            self.logger.close()  # flush TensorBoard even when training stops with an error
        dist.barrier()

    def _loss_dict(self, outputs, targets, images, epoch) -> Dict[str, torch.Tensor]:
        losses = self.criterion(outputs, targets, epoch=epoch)
        if self.dset is not None:
            losses.update(dl.dset_losses(outputs, targets, images.shape[-2:], self.dset, epoch, dist.unwrap_model(self.model)))
        return losses

    def train_one_epoch(self, epoch: int):
        model, cfg = self.model, self.cfg
        model.train()
        self.criterion.train()
        set_epoch_everywhere(model, epoch)
        self.train_loader.sampler.set_epoch(epoch)  # the data order of the epoch: a function of (seed, epoch)
        self.train_loader.generator.manual_seed(loader_seed(self.seed, epoch, dist.get_rank(), train=True))
        for obj in (self.train_loader.dataset, self.train_loader.collate_fn):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        clip = float(cfg.get("clip_max_norm", 0.0) or 0.0)
        max_skips = int(cfg.get("skip_nonfinite_steps", 0) or 0)
        progress = ProgressMeter(self.iters_per_epoch, header=f"epoch {epoch}/{self.epochs}", enabled=self.is_main)
        vis_interval = self.dset["vis_interval"] if self.dset else 0
        t_last = time.time()
        sums: Dict[str, torch.Tensor] = {}
        n_done = 0
        # with skips allowed, a skipped step must also undo what its forward pass changed (BatchNorm running
        # statistics): keep a copy of the buffers (small: a few thousand numbers for R18)
        buffers = [b for b in dist.unwrap_model(model).buffers() if b.is_floating_point() or b.dtype == torch.long] \
            if max_skips > 0 else []
        for i, (images, targets) in enumerate(itertools.islice(self.train_loader, self.iters_per_epoch)):
            saved_buffers = [b.clone() for b in buffers]
            images = images.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
                outputs = model(images, targets)
            with torch.autocast(device_type=self.device.type, enabled=False):
                losses = self._loss_dict(outputs, targets, images, epoch)
            total = sum(losses.values())

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()  # every rank runs backward, so DDP's gradient all-reduce matches
            self.scaler.unscale_(self.optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in params]))
            # one flag for all ranks (one sync per step): every rank skips or stops together instead of hanging.
            # Under AMP an inf gradient is the GradScaler's business (it skips the step and lowers the scale).
            bad = ~torch.isfinite(total.detach())
            if not self.use_amp:
                bad = bad | ~torch.isfinite(grad_norm)
            if dist.all_reduce_sum(bad.float()) > 0:
                self._handle_nonfinite(losses, total, grad_norm, epoch, i, max_skips)
                with torch.no_grad():
                    for b, saved in zip(buffers, saved_buffers):
                        b.copy_(saved)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update()  # closes the unscale_ above; lowers the AMP scale
                self.lr_scheduler.step()  # the schedule follows iterations, skipped or not
                self.global_step += 1
                continue

            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(model)
            self.lr_scheduler.step()
            self.global_step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            sums["loss_total"] = sums.get("loss_total", 0) + total.detach()
            n_done += 1

            if i % self.print_freq == 0 or i == self.iters_per_epoch - 1:
                iter_time = (time.time() - t_last) / (1 if i == 0 else min(self.print_freq, i))
                t_last = time.time()
                self._log_step(losses, total, grad_norm, iter_time, outputs, targets, images, progress, i)
            if vis_interval and self.global_step % vis_interval == 0 and self.is_main:
                self._log_masks(outputs, targets, images)
        means = dist.mean_over_ranks({k: v / max(n_done, 1) for k, v in sums.items()})
        return {k: float(v) for k, v in means.items()}

    def _handle_nonfinite(self, losses, total, grad_norm, epoch, i, max_skips):
        """Count a non-finite step; raise NonFiniteLossError naming the terms once the skips are used up.

        Called on every rank together (the flag is all-reduced); the offending terms are gathered so that
        every rank's message names them."""
        local = [f"{k}={float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v).all()]
        if not local and not torch.isfinite(total):
            local = [f"the sum of the loss terms={float(total.detach())} (every term finite)"]
        if not local and not self.use_amp and not torch.isfinite(grad_norm):
            local = [f"gradient norm={float(grad_norm)} (loss terms finite: the backward pass produced NaN/inf)"]
        per_rank = dist.all_gather_object(local)
        bad = [f"{term} (rank {r})" if len(per_rank) > 1 else term for r, terms in enumerate(per_rank) for term in terms]
        self.nonfinite_skipped += 1
        self.logger.scalars({"train/nonfinite_skipped": self.nonfinite_skipped}, self.global_step)
        where = f"step {self.global_step} (epoch {epoch}, iteration {i})"
        if self.nonfinite_skipped > max_skips:
            last = os.path.join(self.output_dir, "last.pth")
            if self.last_saved_epoch is not None:
                keep = (f"The last good checkpoint is {last} (end of epoch {self.last_saved_epoch}), left untouched: "
                        f"fix the cause and resume with -r {last}.")
            else:
                keep = "No checkpoint was written yet (this is the first epoch of the run)."
            used = f" ({max_skips} skipped step(s) allowed and used)" if max_skips else ""
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {', '.join(bad)}{used}. {keep} Lower the learning rate, check the data "
                f"and the loss weights, or allow skipping bad steps with skip_nonfinite_steps: N")
        if self.is_main:
            print(f"[warn] skipped the step at {where}: non-finite {', '.join(bad)} "
                  f"({self.nonfinite_skipped}/{max_skips} skips used)", flush=True)

    def _log_step(self, losses, total, grad_norm, iter_time, outputs, targets, images, progress, i):
        reduced = dist.mean_over_ranks({**losses, "loss_total": total})  # ranks may have different loss keys
        total = reduced.pop("loss_total")
        scalars = {f"loss/{k[5:] if k.startswith('loss_') else k}": v for k, v in reduced.items()}
        scalars["loss/total"] = total
        scalars["train/grad_norm"] = grad_norm
        scalars["train/iter_time"] = iter_time
        for g in self.optimizer.param_groups:
            scalars[f"lr/{g.get('name', 'group')}"] = g["lr"]
        if self.dset is not None:
            scalars.update(self._dset_scalars(outputs, targets, images))
        self.logger.scalars(scalars, self.global_step)
        progress.update(i, loss=float(total), lr=self.optimizer.param_groups[-1]["lr"], iter_time=iter_time)

    def _dset_scalars(self, outputs, targets, images) -> Dict[str, float]:
        out = {}
        infos = outputs.get("dset_prune_info") or []
        if infos:
            out["dset/keep_ratio"] = sum(float(x["keep_ratio"]) for x in infos) / len(infos)
            out["dset/kept_tokens"] = sum(float(x["num_kept_tokens"]) for x in infos)
            if self.dset["use_cass"]:
                out.update(dl.cass_diagnostics(outputs, targets, images.shape[-2:], self.dset))
        for k, v in dl.expert_usage(dist.unwrap_model(self.model)).items():
            out[f"moe/{k}"] = v
        return out

    def _log_masks(self, outputs, targets, images):
        from src.misc.visualize import cass_mask_figure

        infos = outputs.get("dset_prune_info") or []
        if not infos:
            return
        gt = dl.targets_to_abs_xyxy(targets, images.shape[-2:])
        for level, info in enumerate(infos):
            img = cass_mask_figure(images[0], gt[0], info, self.dset)
            self.logger.image(f"cass/mask_level{level}", img, self.global_step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        from src.zoo.rtdetr import cass

        model = self.ema.module if self.ema else dist.unwrap_model(self.model)
        model.eval()
        # the pruning schedule of the evaluated weights: the epoch just trained, or for --test-only the
        # epoch of the resumed checkpoint (tuned weights without one: the schedule's end, i.e. keep_ratio)
        set_epoch_everywhere(model, epoch if epoch >= 0 else self.schedule_epoch_for_test())
        dataset = self.val_loader.dataset
        evaluator = CocoEvaluator(dataset.ann_file, dataset.label_to_category_id)
        bias_sums: Dict[str, torch.Tensor] = {}
        for images, targets in self.val_loader:
            images = images.to(self.device)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            outputs = model(images)
            sizes = eval_scale_sizes(targets, images.shape[-2:]).to(self.device)
            results = self.postprocessor(outputs, sizes)
            evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
            if self.dset is not None and outputs.get("dset_prune_info"):
                gt = dl.targets_to_abs_xyxy(targets, images.shape[-2:])
                cfg = dl.cass_config_from_dset(self.dset)
                for info in outputs["dset_prune_info"]:
                    stats = cass.keep_bias_stats(info["patch_importance_scores"], gt, info["feat_shape"],
                                                 images.shape[-2:], self.dset["patch_size"],
                                                 self.dset["keep_ratio"], cfg, min_patches=self.dset["min_patches"],
                                                 level=cass.level_name(info["feat_shape"], images.shape[-2:]))
                    for k, v in stats.items():
                        bias_sums[k] = bias_sums.get(k, 0) + dist.all_reduce_sum(v.detach().double())
        stats = evaluator.summarize()
        if bias_sums:
            stats["dset_bias"] = cass.finalize_keep_bias(bias_sums)
        if self.is_main:
            self._write_eval(stats, epoch)
        return stats

    def _write_eval(self, stats: dict, epoch: int):
        from src.zoo.rtdetr import cass

        print(format_table(stats))
        bias = stats.get("dset_bias")
        if bias:
            groups = ("small", "medium", "large", "far", "near")
            print("| DSET keep-recall | " + " | ".join(groups) + " |\n|---|" + "---:|" * len(groups))
            for prefix, name in (("keep_recall", "pruner"), ("oracle_keep_recall", "oracle (top-K of target)")):
                print(f"| {name} | " + " | ".join(f"{bias[f'{prefix}_{g}']:.3f}" for g in groups) + " |")
            print(f"centroid shift dx {bias['centroid_dx']:+.4f}, dy {bias['centroid_dy']:+.4f} (dy < 0: mask drifts up)")
        scalars = {f"eval/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        for row in stats.get("per_class", []):
            scalars[f"eval_per_class/{row['name']}"] = row["AP"]
        for k, v in (stats.get("dset_bias") or {}).items():
            scalars[f"eval_bias/{cass.bias_tag(k)}"] = v   # per level: eval_bias/P4/keep_recall_small
        # undefined metrics (e.g. AP_large without large objects) are NaN: kept in the json, not plotted
        scalars = {k: v for k, v in scalars.items() if not (isinstance(v, float) and math.isnan(v))}
        self.logger.scalars(scalars, self.global_step)
        os.makedirs(os.path.join(self.output_dir, "eval"), exist_ok=True)
        tag = "test" if epoch < 0 else f"{epoch}"
        with open(os.path.join(self.output_dir, "eval", f"{tag}.json"), "w") as f:
            json.dump(stats, f, indent=1, default=float)

    def schedule_epoch_for_test(self) -> int:
        return self.start_epoch - 1 if self.resume_path else self.epochs

    def evaluate_only(self) -> dict:
        return self.evaluate(-1)
