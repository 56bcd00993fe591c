"""bench/gpu_check.py on CPU, in-process: its generated configs, its timing plan, how it reads and judges a run,
its timeouts and process-tree kill, and main() end to end with the train.py runs replaced by a fake that writes
what a run writes. The real dry run (`python -m bench.gpu_check --dry-run --out DIR`, twice in one DIR) takes
minutes on a 2-core CPU and is not run here (docs/reliability.md, section 8, records it)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench import gpu_check
from src.core import YAMLConfig
from src.core.run_config import write_run_config
from src.misc.dist import rank_placement


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return gpu_check.data_dir(tmp_path_factory.mktemp("out"), gpu_check.make_plan(True), "small")


@pytest.mark.parametrize("dry_run", [True, False])
def test_generated_configs_validate_and_prune_at_keep_0_3_from_the_first_step(tmp_path, tiny_data, dry_run):
    plan = gpu_check.make_plan(dry_run)
    for run in plan.runs:
        path = write_run_config(gpu_check.run_config(plan, run, tiny_data, tmp_path / run.key),
                                tmp_path / f"{run.key}.yaml")
        cfg = YAMLConfig(str(path))
        pruner = cfg.dset.pruner
        assert (pruner.keep_ratio, pruner.token_pruning_warmup_epochs, pruner.prune_in_eval) == (0.3, 0, True)
        assert cfg.dset.vis_interval == 0 and cfg["print_freq"] == plan.print_freq
        assert pruner.min_patches == (1 if dry_run else {"large": 10, "small": 4}[run.data])  # the configs' own
        assert cfg["max_iters_per_epoch"] == plan.steps and cfg["epochs"] == (2 if run.resume_of else 1)
        assert cfg["input_size"] == list(plan.sizes[run.data])
        assert cfg["use_amp"] is (run.amp_dtype is not None) and cfg.get("amp_dtype") == run.amp_dtype
        train = cfg["train_dataloader"]
        assert train["total_batch_size"] == plan.batch[run.data]
        assert train["dataset"]["ann_file"] == str(tiny_data / "annotations" / "instances_train.json")
        assert cfg["output_dir"] == str(tmp_path / run.key)
    dtypes = {r.key: r.amp_dtype for r in plan.runs}
    assert dtypes == {"dset_float16": None if dry_run else "float16", "dset_bfloat16": "bfloat16",
                      "ddp_2ranks": None, "ddp_resume": None}
    # every training image set holds enough images for the plan's steps (an epoch must not end early)
    assert plan.num_train("large") == plan.steps * plan.batch["large"]


def test_the_timeouts_add_up_to_at_most_480_s_and_cover_every_step():
    plan = gpu_check.make_plan(False)
    assert sum(plan.timeout(key) for key in gpu_check.TIMEOUTS_S) <= 480
    assert set(gpu_check.TIMEOUTS_S) == {"pytest_cuda", "autocast_probe"} | {r.key for r in plan.runs}


@pytest.mark.parametrize("steps, logged, timed", [(2, [0, 1], 1), (4, [0, 2, 3], 1), (20, [0, 10, 19], 9),
                                                  (21, [0, 10, 20], 10)])
def test_throughput_is_timed_only_over_unlogged_steps_after_warm_up(steps, logged, timed):
    plan = gpu_check.make_plan(False, steps=steps)
    # the trainer logs (TensorBoard, DSET statistics) at i % print_freq == 0 and at the last iteration
    assert [i for i in range(steps) if i % plan.print_freq == 0 or i == steps - 1] == logged
    assert plan.timed_steps == logged[-1] - logged[-2] == timed


def test_two_ranks_on_one_gpu_share_it_over_gloo_and_a_gpu_per_rank_uses_nccl():
    assert [rank_placement(r, 2, 1) for r in (0, 1)] == [("cuda:0", "gloo"), ("cuda:0", "gloo")]
    assert [rank_placement(r, 2, 2) for r in (0, 1)] == [("cuda:0", "nccl"), ("cuda:1", "nccl")]
    assert rank_placement(1, 2, 0) == ("cpu", "gloo")
    plan = gpu_check.make_plan(False, num_gpus=1)
    assert gpu_check.backend_of(plan, plan.runs[2]) == "gloo"
    assert gpu_check.backend_of(gpu_check.make_plan(False, num_gpus=2), plan.runs[2]) == "nccl"
    assert "DDP 2 ranks (gloo)" in gpu_check.title(plan, plan.runs[2])


def _write_run(run_dir: Path, steps: int, epochs: int, keep: float, iter_times, amp_scale=None, overflow=0):
    """What a finished train.py run leaves: TensorBoard scalars and log.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb")) as w:
        for step, t in iter_times:
            w.add_scalar("train/iter_time", t, step)
            w.add_scalar("loss/total", 1.0, step)
            w.add_scalar("dset/keep_ratio", keep, step)
            if amp_scale is not None:
                w.add_scalar("train/amp_scale", amp_scale, step)
    record = {"epoch": epochs - 1, "step": steps * epochs, "skipped_steps": {"amp_overflow": overflow, "nonfinite": 0},
              "eval": {"AP": 0.0, "dset_keep_ratio": keep}}
    (run_dir / "log.jsonl").write_text(json.dumps(record) + "\n")


def test_summary_reads_images_per_second_from_the_last_log_and_judges_the_float16_row(tmp_path):
    plan = gpu_check.make_plan(False)
    fp16 = plan.runs[0]
    _write_run(tmp_path, plan.steps, 1, 0.3, [(1, 9.0), (11, 0.5), (20, 0.25)], amp_scale=32768.0, overflow=2)
    row = gpu_check.summarize_run(tmp_path, batch=8)
    assert row == {"images_per_s": 32.0, "peak_memory_gib": None, "train_keep_ratio": [0.3], "eval_keep_ratio": 0.3,
                   "amp_scale": 32768.0, "skipped_steps": {"amp_overflow": 2, "nonfinite": 0}, "steps": 20,
                   "epoch": 0, "losses_finite": True}
    assert gpu_check.problems_of(plan, fp16, row) == []
    bad = dict(row, train_keep_ratio=[0.3, 1.0], eval_keep_ratio=1.0, amp_scale=float("inf"), images_per_s=None,
               skipped_steps={"amp_overflow": 20, "nonfinite": 0}, autocast={"expected": "float16",
                                                                           "pred_logits": "float32"})
    problems = "\n".join(gpu_check.problems_of(plan, fp16, bad))
    for expected in ("training did not prune at keep 0.3: dset/keep_ratio logged [0.3, 1.0]",
                     "evaluation did not prune at keep 0.3: dset_keep_ratio 1.0",
                     "train/amp_scale is inf", "skipped every step", "train/iter_time was logged fewer than twice",
                     "autocast output dtype float32, expected float16"):
        assert expected in problems
    # a run that stopped early, or whose autocast probe failed, is not ok either
    assert "expected epoch 0, step 20" in "".join(gpu_check.problems_of(plan, fp16, dict(row, steps=12)))
    assert gpu_check.problems_of(plan, fp16, dict(row, autocast=None)) == ["no autocast probe result (autocast_probe.log)"]
    assert gpu_check.problems_of(plan, fp16, dict(row, steps=None)) == ["log.jsonl has no record: the run finished no epoch"]


def test_a_run_folder_from_an_earlier_check_is_deleted_before_the_run(tmp_path):
    run_dir = tmp_path / "runs" / "dset_bfloat16"
    _write_run(run_dir, 20, 1, 1.0, [(1, 1000.0), (11, 1000.0), (20, 1000.0)])
    (run_dir / "last.pth").write_bytes(b"old")
    gpu_check.fresh_run_dir(run_dir)
    assert not run_dir.exists()
    _write_run(run_dir, 2, 1, 0.3, [(1, 1.0), (2, 0.5)])
    row = gpu_check.summarize_run(run_dir, batch=2)
    assert row["train_keep_ratio"] == [0.3] and row["images_per_s"] == 4.0  # nothing of the old event file


GRANDCHILDREN = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
same_group = subprocess.Popen(sleep)
own_session = subprocess.Popen(sleep, start_new_session=True)   # as torchrun starts its workers
open(sys.argv[1], "w").write(f"{same_group.pid} {own_session.pid}")
time.sleep(120)
"""


def test_a_timeout_kills_the_launcher_and_its_grandchildren_also_in_their_own_session(tmp_path):
    script, pids = tmp_path / "launcher.py", tmp_path / "pids"
    script.write_text(textwrap.dedent(GRANDCHILDREN))
    start = time.monotonic()
    rc, _ = gpu_check.run([sys.executable, script, pids], tmp_path / "launcher.log", timeout=8)
    assert rc == 124 and time.monotonic() - start < 30
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2 and not any(gpu_check.is_running(p) for p in children)
    assert "timed out after 8 s" in (tmp_path / "launcher.log").read_text()


def test_evaluation_reports_the_keep_ratio_its_pruners_applied():
    from src.zoo.rtdetr.dset_config import validate_dset
    from src.zoo.rtdetr.dset_hooks import DSETHook

    hook = DSETHook(validate_dset({"patch_size": 2, "keep_ratio": 0.3, "min_patches": 1, "vis_interval": 0}))
    images = torch.zeros(2, 3, 96, 160)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1]),
                "image_id": torch.tensor(i)} for i in range(2)]
    infos = [{"patch_importance_scores": torch.randn(2, 15), "feat_shape": (6, 10), "keep_ratio": 0.3},
             {"patch_importance_scores": torch.randn(2, 6), "feat_shape": (3, 5), "keep_ratio": 1.0}]
    sums = hook.eval_batch({"dset_prune_info": infos}, targets, images)
    twice = {k: v * 2 for k, v in sums.items()}  # two batches of the same images
    metrics = hook.eval_metrics(twice)
    assert metrics["dset_keep_ratio"] == pytest.approx(0.65) and "keep_recall_small" in metrics["dset_bias"]
    assert not any(k.startswith("applied_keep_ratio") for k in metrics["dset_bias"])


def _fake_run(calls):
    """gpu_check.run without subprocesses: a train.py command writes the files of a good run into its config's
    output_dir, the autocast probe writes matching dtypes, pytest succeeds."""
    def fake(cmd, log, timeout):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        if "--autocast-probe" in cmd:
            configs = cmd[cmd.index("--autocast-probe") + 1:]
            dtypes = {Path(c).stem: {"expected": "x", "pred_logits": "x"} for c in configs}
            Path(cmd[cmd.index("--probe-out") + 1]).write_text(json.dumps(dtypes))
        elif any(c.endswith("train.py") for c in cmd):
            cfg = yaml.safe_load(Path(cmd[cmd.index("-c") + 1]).read_text())
            run_dir = Path(cfg["output_dir"])
            steps, epochs = cfg["max_iters_per_epoch"], cfg["epochs"]
            _write_run(run_dir, steps, epochs, 0.3, [(1, 2.0), (steps * epochs, 0.5)],
                       amp_scale=65536.0 if cfg.get("amp_dtype") == "float16" else None)
            (run_dir / "last.pth").write_bytes(b"")
        return 0, 0.1
    return fake


def test_dry_run_twice_in_one_folder_reads_only_its_own_runs_and_writes_only_to_out(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check, "run", _fake_run(calls))
    result_path = tmp_path / "docs_result.json"
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--result", str(result_path)]
    assert gpu_check.main(args) == 0
    # a stale event file with another keep ratio left in a run folder would make the row fail if it were read
    _write_run(out / "runs" / "dset_bfloat16", 2, 1, 1.0, [(1, 1000.0), (2, 1000.0)])
    calls.clear()
    assert gpu_check.main(args) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert not result_path.exists()  # a dry run writes to --out only
    assert result["dry_run"] and [r["ok"] for r in result["rows"]] == [True] * 5
    assert result["rows"][2]["train_keep_ratio"] == [0.3] and result["rows"][2]["images_per_s"] == 4.0
    pytest_cmd, probe, fp16, bf16, ddp, resume = calls
    assert pytest_cmd[1:] == gpu_check.PYTEST_CUDA
    assert probe[-2:] == [str(out / "runs" / "dset_float16.yaml"), str(out / "runs" / "dset_bfloat16.yaml")]
    assert "torch.distributed.run" not in fp16 and fp16[-2:] == ["--device", "cpu"]
    assert ddp[ddp.index("--nproc_per_node") + 1] == "2" and "-r" not in ddp
    assert resume[resume.index("-r") + 1] == str(out / "runs" / "ddp_2ranks" / "last.pth")
    assert capsys.readouterr().out.count("| check | ok |") == 2  # one table per check


def test_a_resume_whose_first_run_failed_is_not_launched_and_fails(tmp_path, monkeypatch):
    calls = []
    good = _fake_run(calls)

    def first_ddp_run_fails(cmd, log, timeout):
        if "ddp_2ranks.yaml" in " ".join(map(str, cmd)):
            return 1, 0.1
        return good(cmd, log, timeout)
    monkeypatch.setattr(gpu_check, "run", first_ddp_run_fails)
    rows = gpu_check.check(gpu_check.make_plan(True), tmp_path)
    assert [r["ok"] for r in rows] == [True, True, True, False, False]
    assert rows[3]["problems"][0] == "exit status 1 (ddp_2ranks.log)"
    assert "nothing to resume" in rows[4]["problems"][0] and not any("ddp_resume.yaml" in " ".join(c) for c in calls)


def test_only_runs_the_chosen_steps_and_refuses_a_resume_without_its_run(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check, "run", _fake_run(calls))
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--only", "dset_bfloat16"]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert [r["key"] for r in result["rows"]] == ["dset_bfloat16"] and result["only"] == ["dset_bfloat16"]
    probe, bf16 = calls  # no pytest, no other run; the probe for the one AMP row only
    assert probe[-1] == str(out / "runs" / "dset_bfloat16.yaml") and "dset_bfloat16.yaml" in " ".join(bf16)
    for only, message in ((["ddp_resume"], "add ddp_2ranks to --only"), (["dset_fp16"], "unknown step")):
        with pytest.raises(SystemExit):
            gpu_check.main(["--dry-run", "--out", str(out), "--only", *only])
        assert message in capsys.readouterr().err


def test_a_partial_check_does_not_replace_the_full_record_unless_asked(tmp_path):
    out, mine = tmp_path / "out", str(tmp_path / "mine.json")
    assert gpu_check.result_paths(out, False, None, None) == [out / "gpu_check.json", gpu_check.RESULT]
    assert gpu_check.result_paths(out, False, ["dset_float16"], None) == [out / "gpu_check.json"]
    assert gpu_check.result_paths(out, False, ["dset_float16"], mine) == [out / "gpu_check.json", Path(mine)]
    assert gpu_check.result_paths(out, True, None, mine) == [out / "gpu_check.json"]  # a dry run: OUT only


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_is_running_treats_an_unreaped_zombie_as_ended():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 20
    while gpu_check.is_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gpu_check.is_running(proc.pid)  # ended, still a zombie until wait()
    proc.wait()
