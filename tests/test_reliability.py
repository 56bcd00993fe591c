"""Reliability of training: exact resume after SIGKILL, non-finite losses, safe checkpoint loading, inputs
smaller than the largest stride, and config errors at startup (docs/reliability.md).

Everything runs on CPU on a tiny synthetic data set (160x96, batch 2) generated into tmp_path.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from src.core import YAMLConfig
from src.core.yaml_utils import ConfigError
from src.solver.trainer import NonFiniteLossError, Trainer
from tests.helpers_tiny_run import (REPO, TRAIN_PY, final_tensors, make_tiny_dataset, read_scalars, run_train,
                                    subprocess_env, write_tiny_config)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """8 training images (4 iterations of batch 2 per epoch) and 2 validation images."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"), num_train=8, num_val=2)


@pytest.fixture(autouse=True)
def _restore_torch_determinism():
    """In-process trainers set global torch flags (deterministic algorithms, seeds): restore them."""
    flag = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to oversubscribed CPUs
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    torch.set_rng_state(rng)


def tiny_trainer(tmp_path, data_root, overrides=None, **trainer_kwargs) -> Trainer:
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out")
    return Trainer(YAMLConfig(str(cfg_path), overrides=overrides or {}), device="cpu", **trainer_kwargs)


# --------------------------------------------------------------------------- 1. exact resume after SIGKILL
def _run_until_epoch_then_kill(args, epoch: int, timeout: float = 120) -> str:
    """Start train.py, stop it (SIGSTOP, then SIGKILL) right after its first iteration of ``epoch``.

    SIGSTOP freezes the process the moment the progress line is read, so the kill lands mid-epoch even on
    a slow machine; SIGKILL then ends it without any cleanup, like an OOM kill or a lost node.
    """
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *args, "--device", "cpu"], cwd=str(REPO),
                            env=subprocess_env(threads=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    watchdog = threading.Timer(timeout, proc.kill)  # a hang ends the read loop below instead of the test run
    watchdog.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"epoch {epoch}/") and "[1/" in line:
                proc.send_signal(signal.SIGSTOP)
                proc.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError("train.py ended (or timed out) before reaching the epoch:\n" + "".join(seen))
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights_ema_and_optimizer(tmp_path, data_root):
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "unused", extra={"epochs": 3})
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"

    ref = run_train(["-c", str(cfg), "--output-dir", str(ref_dir)], threads=1)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # killed in epoch 2: the last.pth of epoch 1 was written before an evaluation that did not improve AP
    # (it stays 0 on this tiny run), so a state captured at the wrong moment (after the evaluation moved the
    # RNGs, or before it while the live run continues after it) shows up as different weights
    _run_until_epoch_then_kill(["-c", str(cfg), "--output-dir", str(cut_dir)], epoch=2)
    killed = torch.load(cut_dir / "last.pth", map_location="cpu", weights_only=True)
    assert killed["epoch"] == 1, "the kill must land in epoch 2, before its checkpoint"
    assert not [f for f in os.listdir(cut_dir) if f.endswith(".tmp")]

    resumed = run_train(["-c", str(cfg), "--output-dir", str(cut_dir), "-r", str(cut_dir / "last.pth")], threads=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume]" in resumed.stdout and "continuing at epoch 2, step 8" in resumed.stdout

    # every checkpoint entry loads with weights_only=True (no pickled objects) ...
    a = torch.load(ref_dir / "last.pth", map_location="cpu", weights_only=True)
    b = torch.load(cut_dir / "last.pth", map_location="cpu", weights_only=True)
    assert (a["epoch"], a["step"], b["epoch"], b["step"]) == (2, 12, 2, 12)
    # ... and the final model and EMA weights are bit-identical to the uninterrupted run
    ta, tb = final_tensors(ref_dir / "last.pth"), final_tensors(cut_dir / "last.pth")
    assert ta.keys() == tb.keys() and any(k.startswith("ema.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_crash_while_trainer_writes_a_checkpoint_keeps_the_previous_one(tmp_path, data_root, monkeypatch):
    trainer = tiny_trainer(tmp_path, data_root, {"max_iters_per_epoch": 1})
    trainer.fit()
    before = final_tensors(tmp_path / "out" / "last.pth")

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save("last.pth", epoch=5)
    monkeypatch.undo()
    after = final_tensors(tmp_path / "out" / "last.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


# --------------------------------------------------------------------------- 2. non-finite losses
class NaNAtCall(torch.nn.Module):
    """Wraps the criterion: at call number ``bad_call`` (0-based) the term ``term`` becomes NaN. Records the
    whole model state (parameters and buffers), the EMA update count and the step at the START of every
    training forward pass, i.e. the state left by the previous step."""

    def __init__(self, criterion, trainer, bad_call: int, term: str):
        super().__init__()
        self.inner, self.bad_call, self.term = criterion, bad_call, term
        self.calls = 0
        self.seen = []

        def record(module, args):
            if module.training:
                self.seen.append(({k: v.detach().clone() for k, v in module.state_dict().items()},
                                  trainer.state.ema.updates if trainer.state.ema else None, trainer.state.step))
        trainer.state.model.register_forward_pre_hook(record)

    def forward(self, outputs, targets, **kwargs):
        losses = self.inner(outputs, targets, **kwargs)
        if self.calls == self.bad_call:
            losses[self.term] = losses[self.term] * float("nan")
        self.calls += 1
        return losses


def test_nan_loss_stops_naming_term_and_step_and_keeps_last_good_checkpoint(tmp_path, data_root):
    trainer = tiny_trainer(tmp_path, data_root, {"epochs": 2, "max_iters_per_epoch": 3})
    trainer.criterion = NaNAtCall(trainer.criterion, trainer, bad_call=4, term="loss_giou_aux_0")
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit()
    msg = str(e.value)
    # call 4 = global step 4 = epoch 1, iteration 1; the term and its value are named
    assert "step 4 (epoch 1, iteration 1)" in msg and "loss_giou_aux_0=nan" in msg
    assert "loss_giou=" not in msg and "skip_nonfinite_steps" in msg
    last = tmp_path / "out" / "last.pth"
    assert f"{last} (end of epoch 0)" in msg
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_skip_nonfinite_steps_skips_without_touching_weights_and_counts_in_tensorboard(tmp_path, data_root):
    trainer = tiny_trainer(tmp_path, data_root, {"epochs": 1, "max_iters_per_epoch": 4, "skip_nonfinite_steps": 1})
    trainer.criterion = NaNAtCall(trainer.criterion, trainer, bad_call=1, term="loss_vfl")
    trainer.fit()
    seen = trainer.criterion.seen
    assert [s[2] for s in seen] == [0, 1, 2, 3]
    # the skipped step (call 1) changed neither the weights, nor the BatchNorm statistics, nor the EMA;
    # the steps around it did
    (w0, u0, _), (w1, u1, _), (w2, u2, _), (w3, u3, _) = seen
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and u1 == u2 == 1
    bn = [k for k in w1 if k.endswith("running_mean")]
    assert bn and not any(torch.equal(w0[k], w1[k]) for k in bn) and not any(torch.equal(w2[k], w3[k]) for k in bn)
    assert not torch.equal(w0["decoder.dec_score_head.0.weight"], w1["decoder.dec_score_head.0.weight"])
    assert (u0, u3) == (0, 2)
    ckpt = torch.load(tmp_path / "out" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["nonfinite_skipped"] == 1 and ckpt["step"] == 4 and ckpt["ema"]["updates"] == 3
    assert read_scalars(tmp_path / "out" / "tb")["train/nonfinite_skipped"] == [(1, 1.0)]


def test_nonfinite_loss_in_train_py_returns_3_with_the_term(tmp_path, data_root, monkeypatch, capsys):
    import train
    from src.zoo.rtdetr.rtdetrv2_criterion import RTDETRCriterionv2

    real_forward = RTDETRCriterionv2.forward

    def nan_bbox(self, outputs, targets, **kwargs):
        losses = real_forward(self, outputs, targets, **kwargs)
        losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    monkeypatch.setattr(RTDETRCriterionv2, "forward", nan_bbox)
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False)
    assert train.main(["-c", str(cfg), "--device", "cpu", "-u", "max_iters_per_epoch=1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("training stopped: non-finite loss at step 0 (epoch 0, iteration 0): loss_bbox=nan")
    assert "No checkpoint was written yet" in err
    assert not (tmp_path / "out" / "last.pth").exists()


# --------------------------------------------------------------------------- 3. safe loading
def _legacy_checkpoint(path: Path, model_state: dict) -> Path:
    """A checkpoint as old training scripts wrote it: weights plus a pickled argparse.Namespace."""
    torch.save({"model": model_state, "args": argparse.Namespace(lr=1e-4, epochs=72)}, path)
    return path


@pytest.mark.parametrize("flag", ["-r", "-t"])
def test_pickled_object_checkpoint_is_refused_with_a_hint_to_trust_checkpoint(tmp_path, data_root, flag, capsys):
    import train

    trainer = tiny_trainer(tmp_path, data_root)
    legacy = _legacy_checkpoint(tmp_path / "legacy.pth", trainer.state.model.state_dict())
    cfg = tmp_path / "tiny.yaml"
    assert train.main(["-c", str(cfg), flag, str(legacy), "--device", "cpu", "--test-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("checkpoint error: ") and str(legacy) in err
    assert "refused by the safe loader" in err and "--trust-checkpoint" in err


def test_trust_checkpoint_opts_in_to_loading_the_legacy_file(tmp_path, data_root, capsys):
    import train

    trainer = tiny_trainer(tmp_path, data_root)
    legacy = _legacy_checkpoint(tmp_path / "legacy.pth", trainer.state.model.state_dict())
    n = len(trainer.state.model.state_dict())
    rc = train.main(["-c", str(tmp_path / "tiny.yaml"), "-t", str(legacy), "--trust-checkpoint", "--device", "cpu",
                     "--test-only", "--output-dir", str(tmp_path / "tuned")])
    assert rc == 0
    assert f"loaded {n}/{n} model tensors" in capsys.readouterr().out
    assert json.loads((tmp_path / "tuned" / "eval" / "test.json").read_text())["num_images"] == 2


# --------------------------------------------------------------------------- 4. inputs smaller than the stride
def test_input_smaller_than_the_largest_stride_is_padded_to_one_stride_and_trains(tmp_path, data_root):
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", hw=(16, 16))
    trainer = Trainer(YAMLConfig(str(cfg_path), overrides={"max_iters_per_epoch": 2}), device="cpu")
    images, targets = next(iter(trainer.train_loader))
    assert images.shape[-2:] == (32, 32) and trainer.max_stride == 32
    assert (images[:, :, 16:, :] == 0).all() and (images[:, :, :, 16:] == 0).all()
    assert all(t["size"].tolist() == [16, 16] for t in targets)
    boxes = torch.cat([t["boxes"] for t in targets])  # cxcywh normalised to the 32x32 canvas
    assert len(boxes) and ((boxes[:, :2] - boxes[:, 2:] / 2) >= -1e-6).all()
    assert ((boxes[:, :2] + boxes[:, 2:] / 2) <= 0.5 + 1e-6).all()
    trainer.fit()
    record = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])
    assert record["train"]["loss_total"] is not None and record["train"]["loss_total"] > 0
    assert record["eval"]["num_images"] == 2


def test_collate_padding_not_a_multiple_of_the_stride_is_a_startup_error(tmp_path, data_root):
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        Trainer(YAMLConfig(str(cfg_path), overrides={"train_dataloader": {"collate_fn": {"size_divisibility": 16}}}),
                device="cpu")
    msg = str(e.value)
    assert "train_dataloader.collate_fn.size_divisibility" in msg and "16" in msg and "stride 32" in msg


# --------------------------------------------------------------------------- 5. config errors at startup
def _bad_configs(tmp_path: Path, data_root: Path) -> dict:
    good = write_tiny_config(tmp_path / "good.yaml", data_root, tmp_path / "out")

    def variant(name, text):
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        return p

    (tmp_path / "cycle_b.yaml").write_text("__include__: [cycle_a.yaml]\n")
    return {
        "unknown key": (variant("unknown", f"__include__: [{good}]\nlearning_rate: 0.1\n"), "learning_rate"),
        "include cycle": (variant("cycle_a", "__include__: [cycle_b.yaml]\n"), "include cycle"),
        "missing include": (variant("missing", "__include__: [nowhere.yaml]\n"), "nowhere.yaml"),
        "keep_ratio": (variant("keep", f"__include__: [{good}]\ndset: {{keep_ratio: 1.5}}\n"), "keep_ratio"),
        "negative loss weight": (variant("weight", f"__include__: [{good}]\nRTDETRCriterionv2: "
                                         f"{{weight_dict: {{loss_vfl: 1, loss_bbox: -5, loss_giou: 2}}}}\n"),
                                 "RTDETRCriterionv2.weight_dict.loss_bbox"),
        "negative CASS weight": (variant("cass", f"__include__: [{good}]\ndset: {{cass_loss_weight: -0.05}}\n"),
                                 "dset.cass_loss_weight"),
        "negative expansion": (variant("expansion", f"__include__: [{good}]\ndset: {{cass_expansion_ratio: -1}}\n"),
                               "dset.cass_expansion_ratio"),
        "negative encoder size": (variant("encoder", f"__include__: [{good}]\nHybridEncoder: {{expansion: -0.5}}\n"),
                                  "HybridEncoder: building DSETHybridEncoder failed"),
        "top_k > num_experts": (variant("topk", f"__include__: [{good}]\ndset: {{num_experts: 2, top_k: 3}}\n"),
                                "top_k"),
        "num_classes < dataset classes": (variant("classes", f"__include__: [{good}]\nnum_classes: 3\n"),
                                          "num_classes"),
    }


@pytest.mark.parametrize("case", ["unknown key", "include cycle", "missing include", "keep_ratio",
                                  "negative loss weight", "negative CASS weight", "negative expansion",
                                  "negative encoder size", "top_k > num_experts", "num_classes < dataset classes"])
def test_config_error_returns_2_and_names_the_key(tmp_path, data_root, case, capsys):
    import train

    path, key = _bad_configs(tmp_path, data_root)[case]
    assert train.main(["-c", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and key in err


@pytest.mark.parametrize("case", ["unknown key", "num_classes < dataset classes"])
def test_train_py_exits_2_with_a_clean_message_on_a_bad_config(tmp_path, data_root, case):
    path, key = _bad_configs(tmp_path, data_root)[case]
    proc = run_train(["-c", str(path)])
    assert proc.returncode == 2
    assert "config error: " in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr
