"""tools/compare_runs.py (+ src/misc/run_summary.py) and tools/cass_bias_bench.py."""
import json
import math
import os

import pytest
import torch

from src.misc.run_summary import RunDirError, read_last_eval, read_log, run_curves, summarize_run
from src.zoo.rtdetr import cass
from tools import cass_bias_bench as bench
from tools.compare_runs import compare, main as compare_main


# ------------------------------------------------------------------------------------------ compare_runs
def _bias(large, near, dy):
    return {"keep_recall_small": 0.1, "keep_recall_medium": 0.2, "keep_recall_large": large,
            "keep_recall_far": 0.3, "keep_recall_near": near, "centroid_dx": 0.0, "centroid_dy": dy,
            "oracle_keep_recall_large": 0.9}


def _write_run(root, name, epochs, with_dset=True):
    """A fake trainer output dir: log.jsonl (one record per epoch) and eval/<epoch>.json."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    with open(run / "log.jsonl", "w") as f:
        for e in epochs:
            train = {"loss_total": 10.0 - e}
            evaluation = {"AP": 0.1 * (e + 1), "AP_small": 0.01 * e, "AP_medium": 0.02 * e, "AP_large": None}
            if with_dset:
                train["loss_cass"] = 0.5 / (e + 1)
                evaluation["dset_bias"] = _bias(0.05 * e, 0.04 * e, -0.001 * e)
            f.write(json.dumps({"epoch": e, "step": 3 * (e + 1), "train": train, "eval": evaluation}) + "\n")
            full = dict(evaluation, AP_large=float("nan"), per_class=[])
            with open(run / "eval" / f"{e}.json", "w") as g:
                json.dump(full, g)      # json writes NaN, as the trainer's json.dump does
    return str(run)


def test_compare_runs_rows_take_last_epoch_numbers_and_dash_for_missing(tmp_path):
    # epochs 0, 2, 10: the last evaluation is 10.json (numeric order, not the string order "10" < "2")
    run_a = _write_run(tmp_path, "run_a", [0, 2, 10])
    run_b = _write_run(tmp_path, "run_b", [0, 1], with_dset=False)
    row_a, row_b = summarize_run(run_a), summarize_run(run_b)
    assert os.path.basename(row_a["eval_file"]) == "10.json"
    assert row_a["AP"] == pytest.approx(1.1) and row_a["AP_small"] == pytest.approx(0.10)
    assert row_a["AP_medium"] == pytest.approx(0.20) and row_a["AP_large"] is None     # NaN -> missing
    assert row_a["keep_recall_large"] == pytest.approx(0.5) and row_a["keep_recall_near"] == pytest.approx(0.4)
    assert row_a["keep_recall_small"] == pytest.approx(0.1) and row_a["keep_recall_far"] == pytest.approx(0.3)
    assert row_a["centroid_dy"] == pytest.approx(-0.010)
    assert row_a["loss_cass"] == pytest.approx(0.5 / 11)
    assert row_b["loss_cass"] is None and row_b["keep_recall_large"] is None
    assert row_b["AP"] == pytest.approx(0.2)

    png = tmp_path / "out" / "curves.png"
    md = tmp_path / "out" / "table.md"
    table = compare([run_a, run_b], out_png=str(png), out_md=str(md))
    lines = table.splitlines()
    assert len(lines) == 4 and md.read_text().strip() == table
    cells_a = [c.strip() for c in lines[2].strip("|").split("|")]
    cells_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells_a == ["run_a", "1.100", "0.100", "0.200", "-", "0.100", "0.200", "0.500", "0.300", "0.400",
                       "-0.0100", f"{0.5 / 11:.4f}"]
    assert cells_b == ["run_b", "0.200", "0.010", "0.020", "-", "-", "-", "-", "-", "-", "-", "-"]
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_curves_follow_log_epochs_and_skip_nulls(tmp_path):
    run = _write_run(tmp_path, "run", [0, 1, 2])
    with open(os.path.join(run, "log.jsonl"), "a") as f:   # an epoch without eval, NaN loss logged as null
        f.write(json.dumps({"epoch": 3, "step": 12, "train": {"loss_cass": None}}) + "\n")
    curves = run_curves(read_log(run))
    assert curves["AP"]["epoch"] == [0, 1, 2]
    assert curves["AP"]["value"] == pytest.approx([0.1, 0.2, 0.3])
    assert curves["loss_cass"]["epoch"] == [0, 1, 2]
    assert curves["keep_recall_large"]["value"] == pytest.approx([0.0, 0.05, 0.10])
    assert curves["keep_recall_near"]["value"] == pytest.approx([0.0, 0.04, 0.08])


def test_compare_runs_missing_dir_or_file_is_an_error_naming_it(tmp_path, capsys):
    good = _write_run(tmp_path, "good", [0])
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(RunDirError, match="no_such_run"):
        compare([good, missing])
    assert compare_main([good, missing]) == 2
    assert "no_such_run" in capsys.readouterr().err

    no_log = _write_run(tmp_path, "no_log", [0])
    os.remove(os.path.join(no_log, "log.jsonl"))
    with pytest.raises(RunDirError, match=r"no_log.*log\.jsonl"):
        summarize_run(no_log)
    no_eval = _write_run(tmp_path, "no_eval", [0])
    os.remove(os.path.join(no_eval, "eval", "0.json"))
    with pytest.raises(RunDirError, match=r"no_eval.*eval"):
        read_last_eval(no_eval)


# ---------------------------------------------------------------------------------------- cass_bias_bench
@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from src.data.synthetic_roadside import generate_dataset

    root = tmp_path_factory.mktemp("tiny_roadside")
    generate_dataset(str(root), num_train=2, num_val=2, width=128, height=96, seed=3, min_objects=4, max_objects=8)
    return str(root)


def _tiny_settings(data):
    return bench.BenchSettings(data=data, steps=2, batch_size=2, input_size=(64, 128), patch_size=1, lr=1e-3)


def test_bench_returns_bounded_metrics_and_is_deterministic(tiny_set):
    settings = _tiny_settings(tiny_set)
    result = bench.run_bench(settings, ["object_balanced"], seeds=[0, 1, 0], log=lambda msg: None)
    runs = result["runs"]
    assert [(r["mode"], r["seed"]) for r in runs] == [(bench.INIT_ROW, 0), ("object_balanced", 0),
                                                      (bench.INIT_ROW, 1), ("object_balanced", 1),
                                                      (bench.INIT_ROW, 0), ("object_balanced", 0)]
    groups = ("small", "medium", "large", "far", "near")
    for run in runs:
        for g in groups:
            assert 0.0 <= run[f"keep_recall_{g}"] <= 1.0
            assert 0.0 <= run[f"oracle_keep_recall_{g}"] <= 1.0
        assert abs(run["centroid_dx"]) <= 1 and abs(run["centroid_dy"]) <= 1
        assert run["top_left_loss"] >= 0 and run["bottom_loss"] >= 0
        assert run["num_boxes_far"] + run["num_boxes_near"] == \
            run["num_boxes_small"] + run["num_boxes_medium"] + run["num_boxes_large"] > 0
    for run in runs[1::2]:
        assert len(run["loss_cass_curve"]) == 2 and all(math.isfinite(v) and v > 0 for v in run["loss_cass_curve"])
    # the same seed twice -> identical numbers; another seed -> another initialisation and other logits
    for first, again in zip(runs[:2], runs[4:]):
        assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert runs[3]["loss_cass_curve"] != runs[1]["loss_cass_curve"]
    assert runs[2]["centroid_dy"] != runs[0]["centroid_dy"]

    summary = result["summary"]
    values = [runs[i]["keep_recall_near"] for i in (1, 3, 5)]
    assert summary["object_balanced"]["keep_recall_near"]["mean"] == pytest.approx(sum(values) / 3)
    assert set(summary) == {bench.INIT_ROW, "object_balanced", "oracle (r=0.3)"}
    table = bench.format_table(summary, show_std=True)
    assert "| object_balanced (r=0.3) |" in table and "±" in table and "| untrained (step 0) |" in table


class _FixedLogitsModel(torch.nn.Module):
    """Stands in for the bench model: random logits per level, remembered for the reference."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size, self.calls = patch_size, []
        self.generator = torch.Generator().manual_seed(0)

    def prune_infos(self, images):
        h, w = images.shape[-2:]
        infos = []
        for stride in (16, 32):
            feat = (math.ceil(h / stride), math.ceil(w / stride))
            grid = cass.patch_grid(feat, self.patch_size)
            logits = torch.randn(images.shape[0], grid[0] * grid[1], generator=self.generator)
            infos.append({"patch_importance_scores": logits, "feat_shape": feat})
        self.calls.append((images.shape[-2:], infos))
        return infos


def _reference_keep_recall(calls, samples, settings, batch_size):
    """Per-box loop: kept core patches / core patches, averaged per group over every level and image."""
    H, W = settings.input_size
    k = settings.patch_size
    sums, counts = {}, {}
    for b0, (_, infos) in zip(range(0, len(samples), batch_size), calls):
        for info in infos:
            h, w = info["feat_shape"]
            logits = info["patch_importance_scores"]
            pw = math.ceil(w / k)
            keep = cass.keep_count(logits.shape[1], settings.keep_ratio, settings.min_patches)
            for i in range(logits.shape[0]):
                kept = set(torch.sort(logits[i], descending=True, stable=True).indices[:keep].tolist())
                for x1, y1, x2, y2 in samples[b0 + i][1]["boxes"].tolist():
                    cx1, cx2, cy1, cy2 = x1 * w / W, x2 * w / W, y1 * h / H, y2 * h / H
                    if cx2 - cx1 < 2:
                        cx1, cx2 = (cx1 + cx2) / 2 - 1, (cx1 + cx2) / 2 + 1
                    if cy2 - cy1 < 2:
                        cy1, cy2 = (cy1 + cy2) / 2 - 1, (cy1 + cy2) / 2 + 1
                    core = [p for p in range(logits.shape[1])
                            if cx1 <= (p % pw + 0.5) * k <= cx2 and cy1 <= (p // pw + 0.5) * k <= cy2]
                    if not core:
                        continue
                    recall = sum(p in kept for p in core) / len(core)
                    area = (x2 - x1) * (y2 - y1)
                    size = "small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"
                    region = "far" if (y1 + y2) / 2 < H / 2 else "near"
                    for g in (size, region):
                        sums[g] = sums.get(g, 0.0) + recall
                        counts[g] = counts.get(g, 0) + 1
    return {g: sums[g] / counts[g] for g in sums}, counts


def test_evaluate_bias_pools_levels_and_batches_like_a_per_box_loop(tiny_set):
    settings = bench.BenchSettings(data=tiny_set, input_size=(96, 128), patch_size=1, eval_batch_size=1)
    samples = bench.load_split(tiny_set, "train", settings.input_size) + \
        bench.load_split(tiny_set, "val", settings.input_size)
    model = _FixedLogitsModel(settings.patch_size)
    result = bench.evaluate_bias(model, samples, settings, bench.MODES["patch"].cass_config())
    assert len(model.calls) == len(samples)       # eval_batch_size 1: one call per image
    expected, counts = _reference_keep_recall(model.calls, samples, settings, batch_size=1)
    assert expected
    for g, value in expected.items():
        assert result[f"keep_recall_{g}"] == pytest.approx(value, abs=1e-6)
        assert result[f"num_boxes_{g}"] == counts[g]
