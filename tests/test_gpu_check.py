"""bench/gpu_check.py's logic on CPU, without its training runs (the full `--dry-run` takes minutes on a
2-core CPU: `python -m bench.gpu_check --dry-run --out /tmp/gpu_dry`). The configs it generates validate,
the table is read from real TensorBoard / log.jsonl files, and main() launches the intended commands."""
from __future__ import annotations

import json

import pytest

from bench import gpu_check
from src.core import YAMLConfig


@pytest.mark.parametrize("base", ["dset4_r18_synth_cpu.yaml", "dset4_r18_ratio0.3.yaml"])
def test_generated_run_configs_validate_and_point_at_the_synthetic_set(tmp_path, base):
    data = gpu_check.make_data(tmp_path / "data", 160, 96, 2, 2)
    path = gpu_check.run_config(base, data, tmp_path / "runs" / "r", [96, 160], steps=3, batch=None, dry_run=True)
    cfg = YAMLConfig(str(path))
    train = cfg["train_dataloader"]
    assert train["dataset"]["ann_file"] == str(data / "annotations" / "instances_train.json")
    assert train["dataset"]["transforms"]["ops"][2] == {"type": "Resize", "size": [96, 160]}
    assert cfg["max_iters_per_epoch"] == 3 and cfg["epochs"] == 1 and cfg.dset is not None
    assert train["total_batch_size"] == (4 if "synth" in base else 8)  # the config's own batch


def test_summarize_run_reads_steps_per_second_memory_skips_and_finiteness(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as w:
        for step, (t, loss) in enumerate([(9.0, 3.0), (0.5, 2.0), (0.25, 1.5), (0.5, float("nan"))]):
            w.add_scalar("train/iter_time", t, step)
            w.add_scalar("loss/total", loss, step)
            w.add_scalar("train/peak_memory_gib", 1.0 + step, step)
    (tmp_path / "log.jsonl").write_text(json.dumps({"skipped_steps": {"amp_overflow": 2, "nonfinite": 0}}) + "\n")
    row = gpu_check.summarize_run(tmp_path)
    # first step (warm-up) dropped; the median of 0.25, 0.5, 0.5 is 0.5 s -> 2 steps/s
    assert row == {"steps_per_s": 2.0, "peak_memory_gib": 4.0, "skipped_steps": {"amp_overflow": 2, "nonfinite": 0},
                   "losses_finite": False}


def test_dry_run_launches_pytest_torchrun_and_train_py_and_writes_the_table(tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(gpu_check, "run", lambda cmd, log, timeout: (commands.append(cmd) or 0, 1.0))
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert rc == 1  # the faked runs wrote no TensorBoard files: losses not shown finite
    pytest_cmd, torchrun_cmd, train_cmd = commands
    assert pytest_cmd[1:] == ["-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    assert "torch.distributed.run" in torchrun_cmd and "--nproc_per_node" in torchrun_cmd
    assert "torch.distributed.run" not in train_cmd and train_cmd[-2:] == ["--device", "cpu"]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and [r["check"] for r in result["rows"]][0] == "pytest -m cuda"
    assert len(result["rows"]) == 3 and "| check | ok |" in capsys.readouterr().out
