"""The training loop: read it top to bottom.

Trainer(cfg, args).fit() trains and evaluates; .evaluate_only() runs one evaluation. Everything the loop
needs is built in ``_setup``; checkpoints hold the full state (model, EMA, optimizer, scheduler, scaler,
epoch, step, best metric, config, RNG states) so ``-r last.pth`` continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List

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
    """Raised when a loss term is NaN/inf and no more skips are allowed."""


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def set_epoch_everywhere(model: nn.Module, epoch: int):
    """Tell epoch-dependent modules (pruner warmup) the epoch."""
    for m in unwrap(model).modules():
        if m is not model and hasattr(m, "set_epoch") and callable(m.set_epoch):
            m.set_epoch(epoch)


def eval_scale_sizes(targets: List[dict], padded_hw) -> torch.Tensor:
    """Size of the padded canvas in ORIGINAL image pixels, per image: [B, 2] as (w, h).

    Boxes come out normalised to the padded input; multiplying by this maps them to original pixels.
    """
    ph, pw = padded_hw
    rows = []
    for t in targets:
        ow, oh = t["orig_size"].tolist()
        sw, sh = t["size"].tolist()
        rows.append([pw * ow / sw, ph * oh / sh])
    return torch.tensor(rows, dtype=torch.float32)


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
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        seed_everything(self.seed + dist.get_rank(), deterministic=bool(cfg.get("deterministic", False)))
        self.is_main = dist.is_main_process()
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)

        model = cfg.model
        if self.tuning_path:
            self._load_tuning_weights(model, self.tuning_path)
        if self.distributed and cfg.get("sync_bn", False) and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.criterion = cfg.criterion.to(self.device)
        self.postprocessor = cfg.postprocessor.to(self.device)

        self.train_loader = self._build_loader("train_dataloader", train=True) if "train_dataloader" in cfg else None
        self.val_loader = self._build_loader("val_dataloader", train=False) if "val_dataloader" in cfg else None
        self._check_num_classes()

        self.optimizer = build_optimizer(self.model, cfg.get("optimizer", {"type": "AdamW", "lr": 1e-4}))
        check_param_groups(self.model, self.optimizer)
        self.iters_per_epoch = self._iters_per_epoch()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.get("lr_scheduler"),
                                               cfg.get("lr_warmup_scheduler"), self.iters_per_epoch, self.epochs)
        self.ema = ModelEMA(self.model, **cfg.get("ema", {})) if cfg.get("use_ema", False) else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))

        self.logger = TrainLogger(self.output_dir, enabled=self.is_main)
        self.start_epoch, self.global_step, self.best_ap = 0, 0, -1.0
        self.nonfinite_skipped = 0
        if self.resume_path:
            self.load_state(self.resume_path)

    def _load_tuning_weights(self, model: nn.Module, path: str):
        report = load_pretrained(model, path, trusted=self.trusted)
        if dist.is_main_process():
            print(f"[tune] {path}:\n{report}")

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
        sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.get_rank(),
                                     shuffle=bool(section.get("shuffle", train)), seed=self.seed,
                                     drop_last=False)
        return DataLoader(dataset, batch_size=total_bs // world, sampler=sampler,
                          num_workers=int(section.get("num_workers", 0)), collate_fn=collate,
                          drop_last=bool(section.get("drop_last", False)),
                          pin_memory=bool(section.get("pin_memory", False)),
                          persistent_workers=False)

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

    def _iters_per_epoch(self) -> int:
        if self.train_loader is None:
            return 1
        n = len(self.train_loader)
        cap = self.cfg.get("max_iters_per_epoch")
        return max(1, min(n, int(cap)) if cap else n)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.global_step,
            "best_ap": self.best_ap,
            "nonfinite_skipped": self.nonfinite_skipped,
            "config": self.cfg.yaml_cfg,
            "rng": get_rng_state(),
        }

    def load_state(self, path: str):
        ckpt = load_checkpoint(path, trusted=self.trusted)
        if "optimizer" not in ckpt:
            raise ValueError(f"{path} is a weights file, not a training checkpoint: use -t {path} to tune from it")
        unwrap(self.model).load_state_dict(ckpt["model"])
        if self.ema and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["step"])
        self.best_ap = float(ckpt["best_ap"])
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])
        if self.is_main:
            print(f"[resume] {path}: continuing at epoch {self.start_epoch}, step {self.global_step}")

    def save(self, name: str, epoch: int):
        if self.is_main:
            save_checkpoint(self.state_dict(epoch), os.path.join(self.output_dir, name))

    # ------------------------------------------------------------------ training
    def fit(self):
        for epoch in range(self.start_epoch, self.epochs):
            train_stats = self.train_one_epoch(epoch)
            record = {"epoch": epoch, "step": self.global_step, "train": train_stats}
            self.save("last.pth", epoch)
            freq = int(self.cfg.get("checkpoint_freq", 0) or 0)
            if freq and (epoch + 1) % freq == 0:
                self.save(f"checkpoint{epoch:04d}.pth", epoch)
            eval_freq = int(self.cfg.get("eval_freq", 1) or 1)
            if self.val_loader is not None and ((epoch + 1) % eval_freq == 0 or epoch == self.epochs - 1):
                stats = self.evaluate(epoch)
                record["eval"] = {k: v for k, v in stats.items() if k != "per_class"}
                if stats["AP"] > self.best_ap:
                    self.best_ap = stats["AP"]
                    self.save("last.pth", epoch)
                    self.save("best.pth", epoch)
            self.logger.epoch_record(record)
        self.logger.close()
        dist.barrier()

    def _loss_dict(self, outputs, targets, images, epoch) -> Dict[str, torch.Tensor]:
        losses = self.criterion(outputs, targets, epoch=epoch)
        if self.dset is not None:
            losses.update(dl.dset_losses(outputs, targets, images.shape[-2:], self.dset, epoch, unwrap(self.model)))
        return losses

    def train_one_epoch(self, epoch: int):
        model, cfg = self.model, self.cfg
        model.train()
        self.criterion.train()
        set_epoch_everywhere(model, epoch)
        self.train_loader.sampler.set_epoch(epoch)
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
        for i, (images, targets) in enumerate(self.train_loader):
            if i >= self.iters_per_epoch:
                break
            images = images.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
                outputs = model(images, targets)
            with torch.autocast(device_type=self.device.type, enabled=False):
                losses = self._loss_dict(outputs, targets, images, epoch)
            total = sum(losses.values())

            # one flag for all ranks, so every rank skips (or stops) together instead of hanging in DDP
            bad_ranks = dist.all_reduce_sum((~torch.isfinite(total.detach())).float())
            if bad_ranks > 0:
                self._handle_nonfinite(losses, epoch, i, max_skips)
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.global_step += 1
                continue

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in params]))
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
        return {k: float(dist.all_reduce_mean(v / max(n_done, 1))) for k, v in sums.items()}

    def _handle_nonfinite(self, losses, epoch, i, max_skips):
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["(another rank)"]
        self.nonfinite_skipped += 1
        self.logger.scalars({"train/nonfinite_skipped": self.nonfinite_skipped}, self.global_step)
        where = f"step {self.global_step} (epoch {epoch}, iteration {i})"
        if self.nonfinite_skipped > max_skips:
            last = os.path.join(self.output_dir, "last.pth")
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {', '.join(f'{k}={float(losses[k])}' if k in losses else k for k in bad)}. "
                f"The last good checkpoint is {last} (if an epoch finished). Lower the lr, check the data, "
                f"or allow skips with skip_nonfinite_steps: N")
        if self.is_main:
            print(f"[warn] skipped non-finite loss at {where}: {bad} "
                  f"({self.nonfinite_skipped}/{max_skips} skips used)")

    def _log_step(self, losses, total, grad_norm, iter_time, outputs, targets, images, progress, i):
        reduced = {k: dist.all_reduce_mean(v.detach()) for k, v in losses.items()}
        total = dist.all_reduce_mean(total.detach())
        scalars = {f"loss/{k[5:] if k.startswith('loss_') else k}": v for k, v in reduced.items()}
        scalars["loss/total"] = total
        scalars["train/grad_norm"] = grad_norm
        scalars["train/iter_time"] = iter_time
        for g in self.optimizer.param_groups:
            scalars[f"lr/{g.get('name', 'group')}"] = g["lr"]
        if self.dset is not None:
            scalars.update(self._dset_scalars(outputs, targets, images))
        self.logger.scalars(scalars, self.global_step)
        progress.update(i, loss=float(total), lr=self.optimizer.param_groups[0]["lr"], iter_time=iter_time)

    def _dset_scalars(self, outputs, targets, images) -> Dict[str, float]:
        out = {}
        infos = outputs.get("dset_prune_info") or []
        if infos:
            out["dset/keep_ratio"] = sum(float(x["keep_ratio"]) for x in infos) / len(infos)
            out["dset/kept_tokens"] = sum(float(x["num_kept_tokens"]) for x in infos)
            if self.dset["use_cass"]:
                out.update(dl.cass_diagnostics(outputs, targets, images.shape[-2:], self.dset))
        for k, v in dl.expert_usage(unwrap(self.model)).items():
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

        model = self.ema.module if self.ema else unwrap(self.model)
        model.eval()
        set_epoch_everywhere(model, max(epoch, 0))
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
                                                 self.dset["keep_ratio"], cfg, min_patches=self.dset["min_patches"])
                    for k, v in stats.items():
                        bias_sums[k] = bias_sums.get(k, 0) + dist.all_reduce_sum(v.detach().double())
        stats = evaluator.summarize()
        if bias_sums:
            stats["dset_bias"] = cass.finalize_keep_bias(bias_sums)
        if self.is_main:
            self._write_eval(stats, epoch)
        return stats

    def _write_eval(self, stats: dict, epoch: int):
        print(format_table(stats))
        scalars = {f"eval/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        for row in stats.get("per_class", []):
            scalars[f"eval_per_class/{row['name']}"] = row["AP"]
        for k, v in (stats.get("dset_bias") or {}).items():
            scalars[f"eval_bias/{k}"] = v
        self.logger.scalars(scalars, self.global_step)
        os.makedirs(os.path.join(self.output_dir, "eval"), exist_ok=True)
        tag = "test" if epoch < 0 else f"{epoch}"
        with open(os.path.join(self.output_dir, "eval", f"{tag}.json"), "w") as f:
            json.dump(stats, f, indent=1, default=float)

    def evaluate_only(self) -> dict:
        return self.evaluate(-1)
