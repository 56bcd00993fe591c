"""train.py refuses, at start and with one clear message, runs that would silently do the wrong thing (issue 10):
a training set smaller than one batch, a new run into another run's output directory, a file that is not a
checkpoint, a -r checkpoint of another num_classes; --test-only and Ctrl-C say the right thing."""
import os

import pytest
import torch

import train
from helpers_tiny_run import make_tiny_dataset, write_tiny_config
from src.core import YAMLConfig
from src.solver.trainer import Trainer
from test_reliability import _restore_torch_determinism  # noqa: F401  (autouse: in-process trainers set torch flags)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("guard_data"), num_train=2, num_val=1)


def _config(tmp_path, data_root, **extra):
    return str(write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False, extra=extra))


def _too_small_train_set(cfg_path):
    return ["-c", cfg_path, "--device", "cpu", "-u", "train_dataloader.total_batch_size=4",
            "train_dataloader.drop_last=true"]


def test_training_set_smaller_than_one_batch_with_drop_last_is_an_error_at_start(tmp_path, data_root, capsys):
    assert train.main(_too_small_train_set(_config(tmp_path, data_root))) == 2
    err = capsys.readouterr().err
    assert "2 image(s) per process, fewer than one batch of 4 with drop_last: true" in err
    assert "total_batch_size" in err and not os.path.exists(tmp_path / "out" / "last.pth")


def test_new_run_into_an_existing_run_directory_is_refused_unless_overwrite(tmp_path, data_root, capsys):
    cfg = _config(tmp_path, data_root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 0}\n')
    (out / "last.pth").write_bytes(b"previous run")
    assert train.main(["-c", cfg, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"output directory {str(out)!r} already holds a run (last.pth, log.jsonl)" in err
    assert f"-r {out / 'last.pth'}" in err and "--output-dir" in err and "--overwrite" in err
    assert (out / "last.pth").read_bytes() == b"previous run"
    # --overwrite passes this check (the run then stops at the next one: the too-small training set)
    assert train.main(_too_small_train_set(cfg) + ["--overwrite"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-r", "-t"])
@pytest.mark.parametrize("trust", [False, True])
def test_random_bytes_and_truncated_checkpoints_are_named_as_such_with_exit_2(tmp_path, data_root, capsys, flag, trust):
    cfg = _config(tmp_path, data_root)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    good = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(4096)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    extra = ["--trust-checkpoint"] if trust else []
    for path, what in ((junk, "not a PyTorch checkpoint"), (truncated, "truncated PyTorch checkpoint")):
        rc = train.main(["-c", cfg, "--device", "cpu", "--test-only", flag, str(path)] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"checkpoint error: {path}: {what}"), err
        assert "refused by the safe loader" not in err and "Traceback" not in err


def test_resume_with_another_num_classes_names_the_tensors_and_shapes_and_points_to_t(tmp_path, data_root, capsys):
    cfg = _config(tmp_path, data_root)
    trainer = Trainer(YAMLConfig(cfg), device="cpu", output_dir=str(tmp_path / "a"))
    trainer.save("last.pth", 0)
    ckpt = str(tmp_path / "a" / "last.pth")
    rc = train.main(["-c", cfg, "--device", "cpu", "-r", ckpt, "-u", "num_classes=7", "--output-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match the model built from the config" in err
    assert "decoder.denoising_class_embed.weight: [6, 64] vs [8, 64]" in err  # num_classes + 1 rows
    assert "score_head" in err and "another num_classes" in err and f"with -t {ckpt}" in err

    # --test-only on the matching checkpoint evaluates it and does not claim to continue training
    rc = train.main(["-c", cfg, "--device", "cpu", "-r", ckpt, "--test-only", "--output-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0 and "evaluating the weights of epoch 0" in out and "continuing at epoch" not in out


def test_ctrl_c_prints_one_line_with_the_resume_command_and_keeps_last_pth(tmp_path, data_root, capsys, monkeypatch):
    cfg = _config(tmp_path, data_root, epochs=3, eval_freq=10)
    calls = []

    def fake_epoch(self, epoch):  # epoch 0 "trains" instantly, Ctrl-C arrives during epoch 1
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(Trainer, "train_one_epoch", fake_epoch)
    rc = train.main(["-c", cfg, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    last = tmp_path / "out" / "last.pth"
    assert rc == 130 and calls == [0, 1]
    assert err == (f"interrupted; {last} (end of epoch 0) is complete and untouched, resume with: "
                   f"python train.py -c {cfg} -r {last}")
    assert torch.load(str(last), weights_only=True)["epoch"] == 0
