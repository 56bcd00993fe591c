"""Shared helpers for end-to-end training tests: a tiny synthetic data set and a tiny config in tmp_path.

The config includes the repository's real configs (by absolute path) and only shrinks sizes, so the
tests exercise the same code paths as a real run: RT-DETRv2-R18 (or DSET on top of it) at 160x96,
a 64-channel encoder/decoder, 20 queries, 10 denoising queries, batch 2.

    data = make_tiny_dataset(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, tmp_path / "out", dset=True)
    proc = run_train(["-c", str(cfg), "-u", "epochs=2"])
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import pytest
import torch
import yaml

from src.data.synthetic_roadside import generate_dataset
from src.misc.dist import free_port  # noqa: F401  (re-exported for the DDP tests)
from src.misc.run_summary import read_scalars  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
TINY_HW = (96, 160)  # input [h, w]: P3/P4/P5 maps 12x20, 6x10, 3x5


def make_tiny_dataset(root: Path, num_train: int = 4, num_val: int = 2, width: int = 160, height: int = 96,
                      seed: int = 0, empty_train: Iterable[int] = (), identical_train_pixels: bool = False) -> Path:
    """Render a tiny synthetic roadside set into ``root`` and return ``root``.

    empty_train: 0-based indices of training images whose annotations are removed (images with no box).
    identical_train_pixels: every training image entry points to the file of image 0 and carries image 0's
        annotations (except the ``empty_train`` ones), so per-image features are identical and BatchNorm
        batch statistics do not depend on how the batch is split over processes.
    """
    root = Path(root)
    generate_dataset(str(root), num_train=num_train, num_val=num_val, width=width, height=height, seed=seed,
                     min_objects=6, max_objects=10, image_format="png")
    ann_path = root / "annotations" / "instances_train.json"
    coco = json.loads(ann_path.read_text())
    anns = coco["annotations"]
    if identical_train_pixels:
        first = coco["images"][0]
        template = [a for a in anns if a["image_id"] == first["id"]]
        anns = []
        for img in coco["images"]:
            img["file_name"] = first["file_name"]
            anns += [{**a, "image_id": img["id"]} for a in template]
    empty_ids = {coco["images"][i]["id"] for i in empty_train}
    anns = [a for a in anns if a["image_id"] not in empty_ids]
    for i, a in enumerate(anns):
        a["id"] = i + 1
    coco["annotations"] = anns
    ann_path.write_text(json.dumps(coco))
    return root


def count_train_boxes(root: Path) -> Dict[int, int]:
    """Non-crowd annotations per training image id (what the data set turns into targets)."""
    coco = json.loads((Path(root) / "annotations" / "instances_train.json").read_text())
    counts = {img["id"]: 0 for img in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            counts[a["image_id"]] += 1
    return counts


def _loader(data_root: Path, split: str, batch: int, hw: Sequence[int], augment: bool) -> dict:
    ops = [{"type": "Resize", "size": list(hw)}, {"type": "ConvertPILImage"}]
    if augment:
        ops = [{"type": "RandomPhotometricDistort", "p": 0.5}, {"type": "RandomHorizontalFlip"}] + ops
    return {
        "total_batch_size": batch,
        "num_workers": 0,
        "shuffle": split == "train",
        "drop_last": False,
        "dataset": {
            "img_folder": str(Path(data_root) / "images" / split),
            "ann_file": str(Path(data_root) / "annotations" / f"instances_{split}.json"),
            "transforms": {"type": "Compose", "policy": None, "ops": ops},
        },
        "collate_fn": {"type": "BatchImageCollateFunction", "scales": None, "stop_epoch": None},
    }


TINY_DSET = {
    "patch_size": 2, "keep_ratio": 0.5, "min_patches": 1, "token_pruning_warmup_epochs": 0,
    "num_experts": 4, "top_k": 2, "moe_noise_std": 0.1, "encoder_moe_num_experts": 4, "encoder_moe_top_k": 2,
    "use_cass": True, "vis_interval": 0,
}


def tiny_config_dict(data_root: Path, out_dir: Path, dset: bool = True, batch: int = 2,
                     hw: Sequence[int] = TINY_HW, augment: bool = True) -> dict:
    """The tiny config as a dict (see module docstring). ``augment``: random photometric distortion and
    horizontal flip in training (they draw from the global RNGs, which exact resume must restore)."""
    base = "dset4_r18_synth_cpu.yaml" if dset else "rtdetrv2_r18vd_coco.yaml"
    cfg = {
        "__include__": [str(REPO / "configs" / base)],
        "num_classes": 5,
        "output_dir": str(out_dir),
        "epochs": 1,
        "print_freq": 1,
        "seed": 0,
        "deterministic": True,
        "use_amp": False,  # the COCO recipe turns float16 AMP on; the tiny runs test fp32 unless they ask
        "max_iters_per_epoch": None,
        "input_size": list(hw),
        "use_ema": True,
        "ema": {"decay": 0.9, "warmups": 2},
        "clip_max_norm": 0.1,
        "sync_bn": False,
        "lr_warmup_scheduler": {"type": "LinearWarmup", "warmup_duration": 2},
        "lr_scheduler": {"type": "MultiStepLR", "milestones": [1000], "gamma": 0.1},
        "HybridEncoder": {"hidden_dim": 64, "dim_feedforward": 128, "nhead": 4},
        "RTDETRTransformerv2": {"feat_channels": [64, 64, 64], "hidden_dim": 64, "num_queries": 20,
                                "num_denoising": 10, "dim_feedforward": 128, "nhead": 4, "num_layers": 2},
        "RTDETRPostProcessor": {"num_top_queries": 20},
        "train_dataloader": _loader(data_root, "train", batch, hw, augment),
        "val_dataloader": _loader(data_root, "val", batch, hw, False),
    }
    if dset:
        cfg["dset"] = dict(TINY_DSET)
    return cfg


def write_tiny_config(path: Path, data_root: Path, out_dir: Path, dset: bool = True, batch: int = 2,
                      hw: Sequence[int] = TINY_HW, augment: bool = True, extra: dict | None = None) -> Path:
    """Write the tiny config (plus ``extra`` top-level keys, replacing whole values) to ``path``."""
    cfg = tiny_config_dict(data_root, out_dir, dset=dset, batch=batch, hw=hw, augment=augment)
    cfg.update(extra or {})
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def subprocess_env(threads: int = 2) -> dict:
    """Environment for child processes: repo on PYTHONPATH, unbuffered output, fixed thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_train(args: List[str], timeout: float = 180, threads: int = 2) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS --device cpu`` to completion; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, str(TRAIN_PY), *args, "--device", "cpu"], cwd=str(REPO),
                          env=subprocess_env(threads), capture_output=True, text=True, timeout=timeout)


def final_tensors(ckpt_path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint's model and EMA weights, keyed 'model.*' / 'ema.*'.

    Loaded with weights_only=True: the trainer's own checkpoints must pass the safe loader.
    """
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    if ckpt.get("ema") is not None:
        out.update({f"ema.{k}": v for k, v in ckpt["ema"]["module"].items()})
    return out


@pytest.fixture(autouse=True)
def one_thread_restored_torch_flags():
    """Autouse fixture for in-process trainers (import it into the test module): one torch thread (tiny
    tensors; immune to oversubscribed CPUs), and the global flags trainers set (deterministic algorithms,
    seeds) restored afterwards."""
    flag, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    torch.set_rng_state(rng)


def assert_same_queries(got: dict, ref: dict, tol: float = 2e-3, max_moved: float = 0.03) -> None:
    """Every query of ``got`` (``pred_logits`` and ``pred_boxes`` of each image) equals one of ``ref`` within ``tol``
    (max abs difference relative to max(1, |value|)), one to one, and at most ``max_moved`` of the queries changed
    place. Two computations of the same detector in another summation order (another device, folded weights) can
    rank queries with near-equal encoder scores the other way round; anything else is a difference."""
    from scipy.optimize import linear_sum_assignment

    feats = [torch.cat([out["pred_logits"], out["pred_boxes"]], -1).detach().cpu().double() for out in (got, ref)]
    for g, r in zip(*feats):  # per image: [Q, C + 4]
        diff = ((g[:, None] - r[None]).abs() / r.abs().clamp(min=1)[None]).amax(-1)  # [Q, Q]
        rows, cols = linear_sum_assignment(diff.numpy())
        worst = diff[rows, cols].max().item()
        assert worst <= tol, f"a query differs by {worst:.2e} (relative) from its best reference counterpart"
        moved = (torch.as_tensor(cols) != torch.as_tensor(rows)).float().mean().item()
        assert moved <= max_moved, f"{moved:.1%} of the queries changed place"
