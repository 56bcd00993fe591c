"""Non-finite model outputs (the usual source of NaN) are caught after the forward pass and before the
matcher, which cannot match NaN boxes: every rank skips together (up to skip_nonfinite_steps) or stops
together naming the output and the step, keeping the last good last.pth. Issue 9, finding 3.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from src.core import YAMLConfig
from src.solver.train_step import nonfinite_outputs
from src.solver.trainer import NonFiniteLossError, Trainer
from tests.helpers_tiny_run import (one_thread_restored_torch_flags,  # noqa: F401 (autouse fixture)
                                    REPO, TRAIN_PY, free_port, make_tiny_dataset, read_scalars, subprocess_env,
                                    tiny_config_dict, write_tiny_config)

# torchrun entry: train.py with RTDETR.forward patched so that on rank NAN_RANK the training forward passes
# number NAN_CALLS (0-based) return NaN boxes in one decoder layer (the aux output 0)
LAUNCHER = """import os, runpy, sys
import torch
from src.zoo.rtdetr.rtdetr import RTDETR
calls = [0]
original = RTDETR.forward
def forward(self, x, targets=None):
    out = original(self, x, targets)
    if self.training:
        if int(os.environ.get("RANK", 0)) == {rank} and calls[0] in {calls}:
            out["aux_outputs"][0]["pred_boxes"] = out["aux_outputs"][0]["pred_boxes"] * float("nan")
        calls[0] += 1
    return out
RTDETR.forward = forward
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def test_nonfinite_outputs_names_every_bad_tensor_of_a_nested_output_dict():
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.tensor([[[0.5, float("inf"), 1, 1]]]),
               "aux_outputs": [{"pred_boxes": torch.full((1, 1, 4), float("nan"))}],
               "dn_meta": {"dn_num_group": 2, "dn_positive_idx": [torch.tensor([0, 1])]}}
    names, flags = nonfinite_outputs(outputs)
    assert names == ["pred_logits", "pred_boxes", "aux_outputs.0.pred_boxes"]  # integer tensors are not checked
    assert flags.tolist() == [False, True, True]


def test_nan_model_output_is_skipped_before_the_matcher_then_stops_naming_it(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", num_train=6, num_val=2)
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data, tmp_path / "out", dset=False)
    trainer = Trainer(YAMLConfig(str(cfg_path), overrides={"skip_nonfinite_steps": 1, "epochs": 2,
                                                           "max_iters_per_epoch": 2}), device="cpu")
    model, calls = trainer.state.model, []

    def nan_boxes(module, args, out):
        if module.training:
            if len(calls) in (2, 3):  # epoch 1: iterations 0 and 1
                out["pred_boxes"] = out["pred_boxes"] * float("nan")
            calls.append(1)
        return out

    model.register_forward_hook(nan_boxes)
    before_criterion = []
    trainer.criterion.register_forward_pre_hook(lambda module, args: before_criterion.append(1))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "non-finite model output at step 3 (epoch 1, iteration 1): model output pred_boxes" in msg
    assert "(1 skipped step(s) allowed and used)" in msg and "end of epoch 0" in msg
    assert len(calls) == 4 and len(before_criterion) == 2  # the criterion never saw the NaN outputs
    assert trainer.state.nonfinite_skipped == 2
    assert read_scalars(tmp_path / "out" / "tb")["train/nonfinite_skipped"] == [(2, 1.0), (3, 2.0)]
    ckpt = torch.load(tmp_path / "out" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_gloo_nan_output_on_one_rank_both_skip_then_both_stop_without_hanging(tmp_path):
    """Rank 1's model outputs NaN at its training forwards 2 and 3 (epoch 1); with one skip allowed both
    ranks skip step 2 together, then both stop at step 3 with exit status 3 and the same message."""
    data = make_tiny_dataset(tmp_path / "data", num_train=8, num_val=2)
    cfg = tiny_config_dict(data, tmp_path / "out", dset=True, batch=4, augment=False)
    cfg.update({"epochs": 2, "max_iters_per_epoch": 2, "skip_nonfinite_steps": 1})
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(rank=1, calls=(2, 3), train=str(TRAIN_PY)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(launcher), "-c", str(cfg_path), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=str(REPO), env=subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=300)  # a hang fails here instead of blocking the test run
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "skipped the step at step 2 (epoch 1, iteration 0): non-finite model output aux_outputs.0.pred_boxes " \
           "(rank 1)" in log
    stop = "training stopped: non-finite model output at step 3 (epoch 1, iteration 1): model output " \
           "aux_outputs.0.pred_boxes (rank 1)"
    assert log.count(stop) == 2, log[-3000:]  # both ranks stop with the same message
    assert "exitcode  : 3" in log or "exit code 3" in log or "exitcode: 3" in log.replace("  ", " "), log[-2000:]
    ckpt = torch.load(tmp_path / "out" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2  # the last good checkpoint, untouched
