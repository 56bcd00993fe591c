"""End to end: train.py on a tiny synthetic roadside set writes TensorBoard, checkpoints and an eval json;
--test-only on the checkpoint reproduces the AP (issues 'pipeline' and 'DSET model')."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers_tiny_run import make_tiny_dataset, run_train, write_tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """4 train images, batch 2, one epoch: two iterations of DSET (pruning on P4/P5, MoE, CASS)."""
    root = tmp_path_factory.mktemp("pipeline")
    data = make_tiny_dataset(root / "data")
    out = root / "out"
    cfg = write_tiny_config(root / "tiny.yaml", data, out, dset=True, augment=False,
                            extra={"dset": {"patch_size": 2, "keep_ratio": 0.3, "token_pruning_warmup_epochs": 0,
                                            "vis_interval": 1}})
    proc = run_train(["-c", str(cfg)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cfg, out, proc.stdout


def test_two_iterations_write_checkpoints_eval_json_and_log_line(tiny_run):
    _, out, stdout = tiny_run
    for name in ("last.pth", "best.pth", "log.jsonl", "eval/0.json"):
        assert (out / name).exists(), name
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "ema", "optimizer", "lr_scheduler", "scaler", "epoch", "step", "best_ap", "config",
            "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2
    ev = json.loads((out / "eval" / "0.json").read_text())
    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
        assert 0.0 <= ev[key] <= 1.0 or ev[key] != ev[key]  # NaN allowed when a bucket has no GT
    assert len(ev["per_class"]) == 5
    assert {"keep_recall_small", "keep_recall_near", "oracle_keep_recall_far", "centroid_dy"} <= set(ev["dset_bias"])
    lines = (out / "log.jsonl").read_text().strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["train"]["loss_cass"] > 0
    assert "| AP |" in stdout  # the evaluation table is printed


def test_tensorboard_has_every_loss_term_lr_grad_norm_and_the_dset_tags(tiny_run):
    _, out, _ = tiny_run
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/vfl", "loss/bbox", "loss/giou", "loss/vfl_aux_0", "loss/vfl_dn_0",
                "loss/vfl_enc_0", "loss/cass", "loss/moe_balance_encoder", "loss/moe_balance_decoder",
                "lr/backbone", "lr/default", "train/grad_norm", "train/iter_time", "dset/keep_ratio",
                "dset/kept_tokens", "cass/top_left_loss", "cass/bottom_loss", "cass/small_obj_loss",
                "eval/AP", "eval/AP50", "eval_bias/keep_recall_large", "eval_bias/centroid_dy",
                "eval_bias/P4/keep_recall_large", "eval_bias/P5/keep_recall_near",
                "moe/decoder.decoder.layers.0.moe/expert0"}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]
    assert acc.Scalars("dset/keep_ratio")[0].value == pytest.approx(0.3)
    assert {"cass/mask_level0", "cass/mask_level1"} <= set(acc.Tags()["images"])


def test_test_only_on_the_checkpoint_reproduces_the_ap(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    proc = run_train(["-c", str(cfg), "-r", str(out / "last.pth"), "--test-only", "--output-dir", str(tmp_path)],
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "eval" / "0.json").read_text())
    again = json.loads((tmp_path / "eval" / "test.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)
    assert again["dset_bias"]["keep_recall_small"] == pytest.approx(first["dset_bias"]["keep_recall_small"])
