"""The training loop: read it top to bottom. Trainer(cfg, args).fit() trains and evaluates; .evaluate_only()
runs one evaluation. ``_setup`` builds everything; what a run changes is one TrainState (state.py); the step
(AMP, clipping, non-finite skips) is train_step.py, the checkpoints (``-r last.pth`` continues exactly where it
stopped, bit-identically on CPU) checkpointing.py, the loaders loaders.py. A model family's losses are its
criterion's; its scalars, pictures and evaluation extras come through hooks (src/core/hooks.py). The
protections: docs/reliability.md; the layers: docs/architecture.md.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Dict, List

import torch
from torch import nn

from src.core.config import YAMLConfig
from src.core.hooks import build_hooks
from src.core.yaml_utils import ConfigError
from src.misc import dist
from src.misc.backends import configure_backends
from src.misc.logger import ProgressMeter, TrainLogger
from src.misc.rng import rng_preserved, seed_everything
from src.misc.transfer import to_float32
from src.optim.ema import ModelEMA
from src.optim.lr_scheduler import build_lr_scheduler
from src.optim.optimizer import build_optimizer, check_param_groups
from src.solver import checkpointing
from src.solver.checkpointing import CheckpointError  # noqa: F401  (public: train.py, tests)
from src.solver.evaluator import evaluator_for, format_table
from src.solver.loaders import (build_loader, check_input_divisibility, check_loss_weights, check_num_classes,
                                check_training_data, iters_per_epoch, largest_stride, multiscale, start_epoch,
                                prepare_val_data, training_classes)
from src.solver.state import TrainState
from src.solver.train_step import (NonFiniteLossError, StepSettings, amp_dtype_for, eval_amp_for,  # noqa: F401
                                   skip_buffers, train_step)


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
                 tuning: str | None = None, trusted_checkpoint: bool = False, test_only: bool = False):
        self.cfg = cfg
        rank_device = dist.init_distributed(device)  # under torchrun: this rank's device (dist.rank_placement)
        self.distributed = rank_device is not None
        self.device = torch.device(rank_device or device)
        self.output_dir = output_dir or cfg.get("output_dir", "./output/run")
        self.seed = cfg.get("seed", 0) if seed is None else seed
        self.use_amp = bool(cfg.get("use_amp", False) if use_amp is None else use_amp)  # CUDA and CPU alike
        self.amp_dtype = amp_dtype_for(cfg, self.device, self.use_amp)  # float16, or bfloat16 (default on CPU)
        self.eval_amp = eval_amp_for(cfg.get("eval_amp"), self.use_amp, self.amp_dtype, self.device)
        self.resume_path, self.tuning_path, self.trusted = resume, tuning or cfg.get("tuning"), trusted_checkpoint
        self.test_only = test_only  # evaluation only: no training-set checks; a resume says what it evaluates
        self.epochs, self.print_freq = int(cfg.get("epochs", 1)), int(cfg.get("print_freq", 50))
        self.hooks = build_hooks(cfg)  # registered by the model side (e.g. src/zoo/rtdetr/dset_hooks.py)
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
            checkpointing.load_tuning_weights(model, self.tuning_path, self.trusted)
        if self.distributed and cfg.get("sync_bn", False) and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        self.criterion = self._build("criterion", lambda: cfg.criterion).to(self.device)
        check_loss_weights(cfg, self.criterion)
        self.postprocessor = self._build("postprocessor", lambda: cfg.postprocessor).to(self.device)

        loaders = {key: build_loader(cfg, key, key.startswith("train"), self.seed, self.device) if key in cfg else None
                   for key in ("train_dataloader", "val_dataloader")}
        self.train_loader, self.val_loader = loaders["train_dataloader"], loaders["val_dataloader"]
        check_num_classes(cfg, loaders.values())
        self.classes, self._evaluator = training_classes(self.train_loader), None  # evaluator: at the first eval
        check_input_divisibility(cfg, loaders, self.max_stride)
        self.backends = configure_backends(self.device, cfg.get("cudnn_benchmark"),
                                           cfg.get("float32_matmul_precision", "high"), multiscale(self.train_loader),
                                           bool(cfg.get("deterministic", False)))
        if not self.test_only:
            check_training_data(cfg, self.train_loader)

        optimizer = build_optimizer(model, cfg.get("optimizer", {"type": "AdamW", "lr": 1e-4}))
        check_param_groups(model, optimizer)
        self.iters_per_epoch = iters_per_epoch(cfg, self.train_loader)
        lr_scheduler = build_lr_scheduler(optimizer, cfg.get("lr_scheduler"), cfg.get("lr_warmup_scheduler"),
                                          self.iters_per_epoch, self.epochs)
        # float16 needs loss scaling (its range ends at 65504); bfloat16 has float32's range and runs without
        scaler = torch.amp.GradScaler(self.device.type, init_scale=float(cfg.get("amp_init_scale", 65536.0)),
                                      enabled=self.use_amp and self.amp_dtype == torch.float16)

        if self.distributed:
            find_unused = bool(cfg.get("find_unused_parameters", False))
            reasons = [r for hook in self.hooks for r in hook.unused_parameter_reasons()]
            if reasons and not find_unused:
                find_unused = True  # without it DDP fails at the step after one where a parameter got no grad
                if self.is_main:
                    print(f"[ddp] find_unused_parameters enabled: parameters can get no gradient in a step "
                          f"({'; '.join(reasons)})")
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused)
        ema = ModelEMA(model, **cfg.get("ema", {})) if cfg.get("use_ema", False) else None  # from broadcast weights
        self.state = TrainState(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, ema=ema)

        self.logger = TrainLogger(self.output_dir, enabled=self.is_main)
        if self.resume_path:
            self.load_state(self.resume_path)
        self.classes = prepare_val_data(self.val_loader, self.classes, self.train_loader, self.is_main)

    def _build(self, key: str, build):
        """Build a component; a RuntimeError from its constructor (e.g. a negative size) is a ConfigError."""
        try:
            return build()
        except RuntimeError as e:
            name = self.cfg.get(key)
            raise ConfigError(f"{self.cfg.where((name,))}: building {key} {name} failed: {e}. Check the sizes in "
                              f"the {name} section and its sub-components") from e

    # ------------------------------------------------------------------ state (src/solver/checkpointing.py)
    def load_state(self, path: str):
        self.classes = checkpointing.load_training_checkpoint(
            self.state, path, self.trusted, self.classes, self.seed, bool(self.cfg.get("deterministic", False)),
            self.test_only, self.is_main)

    def save(self, name: str, epoch: int, copy_to: str | None = None):
        path, copy = (os.path.join(self.output_dir, n) if n else None for n in (name, copy_to))
        checkpointing.save_training_checkpoint(self.state, path, epoch, self.cfg.yaml_cfg, self.classes,
                                               self.distributed, self.is_main, copy)

    # ------------------------------------------------------------------ training
    def fit(self):
        state = self.state
        if state.epoch >= self.epochs and self.is_main:
            print(f"[fit] nothing to do: the checkpoint finished epoch {state.epoch - 1} of {self.epochs}")
        try:
            for epoch in range(state.epoch, self.epochs):
                train_stats = self.train_one_epoch(epoch)
                record = {"epoch": epoch, "step": state.step, "train": train_stats,
                          "skipped_steps": {"amp_overflow": state.amp_overflow_steps,
                                            "nonfinite": state.nonfinite_skipped}}  # run totals
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
                    if stats["AP"] > state.best_ap:
                        state.best_ap = stats["AP"]
                        self.save("best.pth", epoch, copy_to="last.pth")  # one serialisation, also the new last
                self.logger.epoch_record(record)
        finally:
            self.logger.close()  # flush TensorBoard even when training stops with an error
        dist.barrier()

    def train_one_epoch(self, epoch: int):
        model, cfg = self.state.model, self.cfg
        model.train()
        self.criterion.train()
        set_epoch_everywhere(model, epoch)
        start_epoch(self.train_loader, self.seed, epoch)  # data order, worker seeds, epoch policies
        settings = StepSettings(self.device.type, self.amp_dtype, self.use_amp, float(cfg.get("clip_max_norm") or 0.0),
                                int(cfg.get("skip_nonfinite_steps", 0) or 0), self.output_dir, self.is_main)
        progress = ProgressMeter(self.iters_per_epoch, header=f"epoch {epoch}/{self.epochs}", enabled=self.is_main)
        t_last, i_last = time.time(), -1  # time and iteration of the last logged step
        sums: Dict[str, torch.Tensor] = {}
        n_done = 0
        buffers = skip_buffers(model, settings.max_skips)
        for i, (images, targets) in enumerate(itertools.islice(self.train_loader, self.iters_per_epoch)):
            images = images.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            step = train_step(self.state, self.criterion, images, targets, settings, self.logger, epoch, i, buffers)
            if step is None:
                continue
            for k, v in step.losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            sums["loss_total"] = sums.get("loss_total", 0) + step.total.detach()
            n_done += 1

            if i % self.print_freq == 0 or i == self.iters_per_epoch - 1:
                iter_time = (time.time() - t_last) / (i - i_last)  # mean over the iterations since the last log
                t_last, i_last = time.time(), i
                self._log_step(step, iter_time, targets, images, progress, i)
            for hook in self.hooks:
                hook.after_step(self.state.step, self.logger, step.outputs, targets, images)
        means = dist.mean_over_ranks({k: v / max(n_done, 1) for k, v in sums.items()})
        return {k: float(v) for k, v in means.items()}

    def _log_step(self, step, iter_time, targets, images, progress, i):
        reduced = dist.mean_over_ranks({**step.losses, "loss_total": step.total})  # ranks may differ in loss keys
        total = reduced.pop("loss_total")
        scalars = {f"loss/{k[5:] if k.startswith('loss_') else k}": v for k, v in reduced.items()}
        scalars["loss/total"] = total
        if step.grad_norm is not None:  # only finite norms: an AMP overflow step has none
            scalars["train/grad_norm"] = step.grad_norm
        scalars["train/iter_time"] = iter_time
        if self.state.scaler.is_enabled():
            scalars["train/amp_overflow_steps"] = self.state.amp_overflow_steps
            scalars["train/amp_scale"] = self.state.scaler.get_scale()
        if self.device.type == "cuda":
            scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for g in self.state.optimizer.param_groups:
            scalars[f"lr/{g.get('name', 'group')}"] = g["lr"]
        for hook in self.hooks:
            scalars.update(hook.step_scalars(step.outputs, targets, images, self.state.module))
        self.logger.scalars(scalars, self.state.step)
        progress.update(i, loss=float(total), lr=self.state.optimizer.param_groups[-1]["lr"], iter_time=iter_time)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        model = self.state.ema.module if self.state.ema else self.state.module
        model.eval()
        # the pruning schedule of the evaluated weights: the epoch just trained, or for --test-only the
        # epoch of the resumed checkpoint (tuned weights without one: the schedule's end, i.e. keep_ratio)
        set_epoch_everywhere(model, epoch if epoch >= 0 else self.schedule_epoch_for_test())
        self._evaluator = evaluator = self._evaluator or evaluator_for(self.val_loader.dataset, self.classes)
        evaluator.reset()
        hook_sums: List[Dict[str, torch.Tensor]] = [{} for _ in self.hooks]
        for images, targets in self.val_loader:
            images = images.to(self.device)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.eval_amp):
                outputs = model(images)
            outputs = to_float32(outputs)  # postprocessing and the hooks' sums in float32
            sizes = eval_scale_sizes(targets, images.shape[-2:]).to(self.device)
            results = evaluator.results_to_host(self.postprocessor(outputs, sizes))  # one copy a batch
            evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
            for hook, acc in zip(self.hooks, hook_sums):
                for k, v in hook.eval_batch(outputs, targets, images).items():
                    acc[k] = acc.get(k, 0) + v
        stats = evaluator.summarize()
        stats["eval_dtype"] = str(self.amp_dtype).replace("torch.", "") if self.eval_amp else "float32"
        # the hooks' sums of all ranks in ONE collective (keys prefixed by the hook's index)
        flat = dist.sum_over_ranks({f"{h}/{k}": v for h, acc in enumerate(hook_sums) for k, v in acc.items()})
        for h, hook in enumerate(self.hooks):
            sums = {k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/", 1)[0] == str(h)}
            stats.update(hook.eval_metrics(sums))
        if self.is_main:
            self._write_eval(stats, epoch)
        return stats

    def _write_eval(self, stats: dict, epoch: int):
        print(format_table(stats))
        for report in (hook.eval_report(stats) for hook in self.hooks):
            if report:
                print(report)
        scalars = {f"eval/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        for row in stats.get("per_class", []):
            scalars[f"eval_per_class/{row['name']}"] = row["AP"]
        for hook in self.hooks:
            scalars.update(hook.eval_scalars(stats))
        # undefined metrics (e.g. AP_large without large objects) are NaN: kept in the json, not plotted
        scalars = {k: v for k, v in scalars.items() if not (isinstance(v, float) and math.isnan(v))}
        self.logger.scalars(scalars, self.state.step)
        os.makedirs(os.path.join(self.output_dir, "eval"), exist_ok=True)
        tag = "test" if epoch < 0 else f"{epoch}"
        with open(os.path.join(self.output_dir, "eval", f"{tag}.json"), "w") as f:
            json.dump(stats, f, indent=1, default=float)

    def schedule_epoch_for_test(self) -> int:
        return self.state.epoch - 1 if self.resume_path else self.epochs

    def evaluate_only(self) -> dict:
        return self.evaluate(-1)
