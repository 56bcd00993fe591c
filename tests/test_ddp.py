"""DDP on CPU (gloo): 2 processes launched with torchrun, compared with 1 process on the same global batch.

The data set is crafted so that the comparison is exact up to float rounding:

* no shuffle and no random augmentation: rank r gets images r, r+2, ... (DistributedSampler), so the global
  batch of step k is images 4k..4k+3 in both runs, and in step 0 rank 1's batch (images 1, 3) has NO box
  while denoising is on;
* every training image has the same pixels (annotations differ): BatchNorm uses per-rank batch statistics
  (SyncBatchNorm is CUDA-only), which then equal the global-batch statistics;
* no denoising noise and no MoE router noise (random draws would differ with the per-rank batch shapes).

What is then comparable, step 0 (before any update): every detection term (vfl / bbox / giou of the last layer,
the aux, encoder and denoising layers) is a sum over images divided by the box count all-reduced over ranks, so
the mean over ranks equals the 1-process value. The CASS loss (normalised per rank) and the decoder MoE balance
loss (a product of per-rank routing statistics; rank 1 has no denoising queries) are per-rank quantities whose
mean differs from the global-batch value when the ranks' batches differ, so they are only compared in step 1,
where both ranks' batches have boxes (after one update: looser tolerance).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers_tiny_run import (REPO, TRAIN_PY, count_train_boxes, free_port, make_tiny_dataset, read_scalars,
                                    run_train, subprocess_env, tiny_config_dict)

LAUNCHER = """# torchrun entry: train.py's main with a per-rank output directory, to see what each rank writes
import os, runpy, sys
i = sys.argv.index("--output-dir") + 1
sys.argv[i] = os.path.join(sys.argv[i], "rank" + os.environ["RANK"])
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""

NO_NOISE = ["RTDETRTransformerv2.label_noise_ratio=0", "RTDETRTransformerv2.box_noise_scale=0", "dset.moe_noise_std=0"]
PER_RANK_TERMS = ("loss/cass", "loss/moe_balance_decoder", "loss/total")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_ddp_with_an_empty_rank_batch_matches_one_process_and_only_rank0_writes(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", num_train=8, num_val=2, empty_train=(1, 3),
                             identical_train_pixels=True)
    boxes = count_train_boxes(data)
    assert [boxes[i] for i in (2, 4)] == [0, 0] and all(boxes[i] > 0 for i in (1, 3, 5, 6, 7, 8))
    cfg = tiny_config_dict(data, tmp_path / "unused", dset=True, batch=4, augment=False)
    cfg["train_dataloader"]["shuffle"] = False
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(train=str(TRAIN_PY)))

    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(launcher), "-c", str(cfg_path), "--device", "cpu",
           "--output-dir", str(ddp_dir), "-u", *NO_NOISE]
    ddp = subprocess.run(cmd, cwd=str(REPO), env=subprocess_env(threads=1), capture_output=True, text=True,
                         timeout=240)  # a hang fails here instead of blocking the test run
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    single = run_train(["-c", str(cfg_path), "--output-dir", str(single_dir), "-u", *NO_NOISE], threads=1)
    assert single.returncode == 0, single.stderr[-3000:]

    # only rank 0 writes: logs, TensorBoard, eval json and checkpoints; rank 1 creates nothing at all
    rank0 = ddp_dir / "rank0"
    assert not (ddp_dir / "rank1").exists()
    assert sorted(os.listdir(rank0)) == ["best.pth", "eval", "last.pth", "log.jsonl", "tb"]
    assert len([f for f in os.listdir(rank0 / "tb") if f.startswith("events.")]) == 1
    # CASS on: every parameter (the pruner's scorer included) gets a gradient in every step, so DDP runs without
    # find_unused_parameters (DDP would fail at the step after one that left a parameter without gradient)
    assert "find_unused_parameters enabled" not in ddp.stdout

    a, b = read_scalars(rank0 / "tb"), read_scalars(single_dir / "tb")
    loss_tags = sorted(t for t in b if t.startswith("loss/"))
    assert sorted(t for t in a if t.startswith("loss/")) == loss_tags
    assert any("_dn_" in t for t in loss_tags)  # denoising terms exist (rank 0 had boxes in step 0)
    for tag in loss_tags:
        (s0a, v0a), (s1a, v1a) = a[tag]
        (s0b, v0b), (s1b, v1b) = b[tag]
        assert (s0a, s1a, s0b, s1b) == (1, 2, 1, 2)
        if tag not in PER_RANK_TERMS:  # step 0: exact up to float rounding
            assert v0a == pytest.approx(v0b, rel=1e-4, abs=1e-6), tag
        assert v1a == pytest.approx(v1b, rel=1e-3, abs=1e-5), tag  # step 1, after one update

    # evaluation gathers the detections of both ranks: all validation images are scored
    eval_a = (rank0 / "eval" / "0.json").read_text()
    assert '"num_images": 2' in eval_a and '"num_images": 2' in (single_dir / "eval" / "0.json").read_text()
    # the checkpoint holds the RNG state of each rank, so a resumed DDP run continues every stream
    ckpt = torch.load(rank0 / "last.pth", map_location="cpu", weights_only=True)
    assert len(ckpt["rng_per_rank"]) == 2
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])


EMA_PROBE = """# torchrun entry: build the Trainer on each rank and record the model's and the EMA's checksums
import json, os, sys
sys.path.insert(0, {repo!r})
from src.core.config import YAMLConfig
from src.misc.dist import unwrap_model
from src.solver.trainer import Trainer

def checksum(module):
    return sum(float(t.double().sum()) for t in module.state_dict().values() if t.is_floating_point())

tr = Trainer(YAMLConfig(sys.argv[1]), device="cpu", output_dir=sys.argv[2], seed=0)
with open(os.path.join(sys.argv[3], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"model": checksum(unwrap_model(tr.state.model)), "ema": checksum(tr.state.ema.module)}}, f)
"""


def _torchrun(script, args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=str(REPO), env=subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ema_identical_across_ranks(tmp_path):
    """Ranks are seeded with seed + rank, so their freshly built models differ until DDP broadcasts rank 0's
    weights; the EMA must be built from the broadcast weights (ema.warmups 0: no warm-up to hide it)."""
    data = make_tiny_dataset(tmp_path / "data", num_train=4, num_val=2)
    cfg = tiny_config_dict(data, tmp_path / "out", dset=True, batch=2, augment=False)
    cfg["ema"] = {"decay": 0.9, "warmups": 0}
    cfg_path = tmp_path / "ema.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    probe = tmp_path / "probe.py"
    probe.write_text(EMA_PROBE.format(repo=str(REPO)))
    sums = tmp_path / "sums"
    sums.mkdir()
    _torchrun(probe, [str(cfg_path), str(tmp_path / "out"), str(sums)])
    rank0, rank1 = (json.loads((sums / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["model"] == rank1["model"]
    assert rank0["ema"] == rank1["ema"] == rank0["model"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ddp_evaluation_of_an_odd_val_set_equals_one_process_in_every_figure(tmp_path):
    """3 val images on 2 ranks: without padding every image is scored once, so AP and the DSET keep-bias
    sums equal the 1-process evaluation of the same checkpoint."""
    data = make_tiny_dataset(tmp_path / "data", num_train=4, num_val=3)
    cfg = tiny_config_dict(data, tmp_path / "train", dset=True, batch=2, augment=False)
    cfg["val_dataloader"]["total_batch_size"] = 2
    cfg_path = tmp_path / "odd.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    trained = run_train(["-c", str(cfg_path)], threads=1)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = str(tmp_path / "train" / "last.pth")
    single = run_train(["-c", str(cfg_path), "-r", ckpt, "--test-only", "--output-dir", str(tmp_path / "one")],
                       threads=1)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(train=str(TRAIN_PY)))
    _torchrun(launcher, ["-c", str(cfg_path), "--device", "cpu", "-r", ckpt, "--test-only", "--output-dir",
                         str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "eval" / "test.json").read_text())
    two = json.loads((tmp_path / "two" / "rank0" / "eval" / "test.json").read_text())
    assert one["num_images"] == two["num_images"] == 3
    for key in ("AP", "AP50", "AP75", "num_detections"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert set(two["dset_bias"]) == set(one["dset_bias"])
    for key, value in one["dset_bias"].items():   # counts exact (a padded repeat would add boxes), ratios to float32
        tol = 0 if key.startswith("num_") else 1e-6
        assert two["dset_bias"][key] == pytest.approx(value, rel=tol * 10, abs=tol), key
    assert one["dset_bias"]["num_boxes_far"] + one["dset_bias"]["num_boxes_near"] > 0
