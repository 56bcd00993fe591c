"""TensorBoard/JSON logging, console progress, and COCO evaluation."""
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.misc import logger as logger_mod
from src.misc.logger import ProgressMeter, SmoothedValue, TrainLogger
from src.solver.evaluator import METRIC_NAMES, CocoEvaluator, available_backends, format_table


@pytest.fixture
def single_process_group(tmp_path):
    """A real (gloo, world size 1) process group, so the collective code paths run."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg_store", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


# ---------------------------------------------------------------- TrainLogger

def _events(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_images_are_readable_from_tensorboard_events(tmp_path):
    with TrainLogger(tmp_path) as log:
        log.scalars({"loss": torch.tensor(1.5), "lr": 1e-4, "losses": {"bbox": np.float32(0.25)}},
                    step=0, prefix="train")
        log.scalars({"loss": 0.5}, step=10, prefix="train")
        log.image("val/pred", torch.rand(3, 16, 24), step=3)
        log.image("val/mask", np.zeros((8, 12, 3), dtype=np.uint8), step=3)
    acc = _events(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/losses/bbox"}
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(0, 1.5), (10, 0.5)]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-4)
    assert acc.Scalars("train/losses/bbox")[0].value == 0.25
    imgs = {t: acc.Images(t)[0] for t in acc.Tags()["images"]}
    assert (imgs["val/pred"].width, imgs["val/pred"].height, imgs["val/pred"].step) == (24, 16, 3)
    assert (imgs["val/mask"].width, imgs["val/mask"].height) == (12, 8)


def test_epoch_record_appends_json_lines_with_python_numbers(tmp_path):
    log = TrainLogger(tmp_path)
    log.epoch_record({"epoch": 0, "train_loss": torch.tensor(2.0), "AP": np.float64(0.125),
                      "AP_small": float("nan"), "per_class": [{"AP": torch.tensor(0.5)}]})
    log.epoch_record({"epoch": 1, "train_loss": 1.0})
    log.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"epoch": 0, "train_loss": 2.0, "AP": 0.125, "AP_small": None, "per_class": [{"AP": 0.5}]},
        {"epoch": 1, "train_loss": 1.0}]


def test_disabled_logger_writes_nothing(tmp_path):
    log = TrainLogger(tmp_path / "run", enabled=False)
    log.scalars({"loss": 1.0}, step=0)
    log.image("x", torch.zeros(3, 4, 4), step=0)
    log.epoch_record({"epoch": 0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_image_with_wrong_layout_is_an_error_naming_the_tag(tmp_path):
    with TrainLogger(tmp_path) as log, pytest.raises(ValueError, match="val/bad"):
        log.image("val/bad", torch.zeros(16, 16, 3), step=0)


# ---------------------------------------------------------------- progress

def test_smoothed_value_statistics_match_numpy():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    sv = SmoothedValue(window_size=4)
    for v in values:
        sv.update(v)
    window = values[-4:]
    assert (sv.median, sv.avg, sv.max, sv.value) == (np.median(window), np.mean(window), 9.0, 2.0)
    assert sv.global_avg == pytest.approx(np.mean(values))


def test_progress_meter_prints_every_print_freq_with_eta_and_smoothed_values(monkeypatch):
    clock = iter(np.arange(0.0, 100.0, 0.5))  # each perf_counter call advances 0.5 s
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: float(next(clock)))
    lines = []
    meter = ProgressMeter(num_iters=5, print_freq=2, header="Epoch [3]", window_size=2,
                          print_fn=lines.append)
    losses = [4.0, 2.0, 1.0, 3.0, 5.0]
    for i, loss in enumerate(losses):
        meter.update(i, loss=torch.tensor(loss), lr=1e-4 * (i + 1))
    assert len(lines) == 3  # iterations 0, 2, 4
    assert lines[0] == "Epoch [3] [1/5] eta 0:00:02 loss 4.0000 (4.0000) lr 1.000e-04 time 0.500s (0.500s)"
    # iteration 2: window (2, 1) -> median 1.5; global avg of (4, 2, 1) = 2.3333; eta 2 * 0.5 s
    assert lines[1] == "Epoch [3] [3/5] eta 0:00:01 loss 1.5000 (2.3333) lr 3.000e-04 time 0.500s (0.500s)"
    assert lines[2].startswith("Epoch [3] [5/5] eta 0:00:00 loss 4.0000 (3.0000) lr 5.000e-04")
    avg = meter.averages(sync=False)
    assert avg == {"loss": 3.0, "lr": pytest.approx(5e-4), "time": 0.5}


def test_progress_meter_called_every_k_iterations_reports_per_iteration_time(monkeypatch):
    clock = iter([0.0, 0.2, 2.2, 4.2])  # start, then updates at iterations 0, 10, 20
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: next(clock))
    lines = []
    meter = ProgressMeter(num_iters=100, header="ep", print_fn=lines.append)  # print_freq=1
    for i in (0, 10, 20):
        meter.update(i, loss=1.0)
    # 0.2 s for iteration 0, then 2 s per 10 iterations: 0.2 s/iteration; eta = 79 * 0.2 s
    assert lines[-1] == "ep [ 21/100] eta 0:00:15 loss 1.0000 (1.0000) time 0.200s (0.200s)"
    assert meter.averages(sync=False)["time"] == pytest.approx(4.2 / 21)


def test_progress_meter_prints_nothing_when_disabled_and_averages_over_ranks(single_process_group):
    lines = []
    meter = ProgressMeter(num_iters=3, print_freq=1, enabled=False, print_fn=lines.append)
    for i, v in enumerate([1.0, 2.0, 6.0]):
        meter.update(i, loss=v)
    assert lines == []
    assert meter.averages(sync=True)["loss"] == 3.0


# ---------------------------------------------------------------- COCO evaluation

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}, {"id": 9, "name": "bus"}]
LABEL_TO_CAT = {0: 3, 1: 7, 2: 9}
# (image_id, category_id, xywh, iscrowd); 'bus' has no ground truth at all
GT_BOXES = [(1, 3, [10, 10, 50, 40], 0), (1, 7, [100, 20, 20, 60], 0), (1, 3, [120, 100, 60, 30], 0),
            (2, 3, [5, 5, 100, 80], 0), (2, 7, [150, 60, 30, 70], 1),
            (3, 7, [40, 40, 25, 50], 0), (3, 3, [70, 40, 120, 100], 0)]


def _gt_dict():
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": list(map(float, b)),
             "area": float(b[2] * b[3]), "iscrowd": crowd}
            for i, (im, c, b, crowd) in enumerate(GT_BOXES)]
    return {"images": [{"id": i, "width": 200, "height": 160, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
            "categories": CATEGORIES, "annotations": anns}


def _detections(shift_frac=0.0):
    """One detection per non-crowd GT box, shifted right by shift_frac * width, plus a detection
    on the crowd region (must be ignored, not a false positive)."""
    cat_to_label = {v: k for k, v in LABEL_TO_CAT.items()}
    out = {}
    for k, (im, c, (x, y, w, h), crowd) in enumerate(GT_BOXES):
        dx = 0.0 if crowd else shift_frac * w
        r = out.setdefault(im, {"boxes": [], "scores": [], "labels": []})
        r["boxes"].append([x + dx, y, x + dx + w, y + h])
        r["scores"].append(0.9 - 0.05 * k)
        r["labels"].append(cat_to_label[c])
    return {im: {"boxes": torch.tensor(r["boxes"]), "scores": torch.tensor(r["scores"]),
                 "labels": torch.tensor(r["labels"])} for im, r in out.items()}


BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_give_ap_one_with_per_class_entries(backend):
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT, backend=backend)
    ev.update(_detections())
    s = ev.summarize()
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert s[k] > 0.99, k
    assert math.isnan(s["AP_small"])  # no GT box below 32*32 px
    by_name = {c["name"]: c for c in s["per_class"]}
    assert set(by_name) == {"car", "person", "bus"}
    assert by_name["car"]["AP"] > 0.99 and by_name["person"]["AP"] > 0.99
    assert (by_name["car"]["num_gt"], by_name["person"]["num_gt"]) == (4, 2)  # crowd not counted
    assert math.isnan(by_name["bus"]["AP"])  # no ground truth for 'bus'
    assert s["num_images"] == 3 and s["num_detections"] == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_detections_at_iou_two_thirds_pass_four_of_ten_thresholds(backend):
    # a box shifted by w/5 along x has IoU (w - w/5) / (w + w/5) = 2/3 with its GT box, which
    # passes IoU thresholds 0.50, 0.55, 0.60, 0.65 -> AP = 4/10, AP50 = 1, AP75 = 0.
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT, backend=backend)
    ev.update(_detections(shift_frac=0.2))
    s = ev.summarize()
    assert s["AP"] == pytest.approx(0.4, abs=1e-6)
    assert s["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert s["AP75"] == pytest.approx(0.0, abs=1e-6)
    assert [c["AP"] for c in s["per_class"][:2]] == pytest.approx([0.4, 0.4], abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_matches_the_library_summarize_stats(backend):
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT, backend=backend)
    dets = _detections(shift_frac=0.1)
    dets[3]["scores"][0] = 0.05               # reorder confidences to make precision < 1 somewhere
    dets[1]["boxes"][0] += 30.0                 # a false positive
    ev.update(dets)
    s = ev.summarize()
    ev.last_eval.summarize()
    stats = np.asarray(ev.last_eval.stats[:12])
    ours = np.array([s[k] for k in METRIC_NAMES])
    np.testing.assert_allclose(np.nan_to_num(ours, nan=-1.0), stats, atol=1e-9)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both faster-coco-eval and pycocotools")
def test_faster_coco_eval_and_pycocotools_agree():
    summaries = []
    for backend in ("faster_coco_eval", "pycocotools"):
        ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT, backend=backend)
        dets = _detections(shift_frac=0.15)
        dets[2]["boxes"][0, 2:] += 12.0
        ev.update(dets)
        summaries.append(ev.summarize())
    fast, ref = summaries
    for k in METRIC_NAMES:
        assert fast[k] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), k
    assert fast["AP"] < 0.9 and fast["AP_large"] > 0.0
    assert np.allclose([c["AP"] for c in fast["per_class"]], [c["AP"] for c in ref["per_class"]],
                       equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_gives_zero_ap_not_a_crash(backend):
    s = CocoEvaluator(_gt_dict(), LABEL_TO_CAT, backend=backend).summarize()
    assert s["AP"] == 0.0 and s["AP50"] == 0.0 and s["AR100"] == 0.0
    assert [c["AP"] for c in s["per_class"][:2]] == [0.0, 0.0]
    assert s["num_detections"] == 0


def test_distributed_gather_path_gives_same_summary(single_process_group):
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT)
    ev.update(_detections(shift_frac=0.2))
    assert ev.summarize()["AP"] == pytest.approx(0.4, abs=1e-6)


def test_update_rejects_unknown_image_and_unmapped_label():
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT)
    one = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}
    with pytest.raises(KeyError, match="image_id 42"):
        ev.update({42: one})
    with pytest.raises(KeyError, match=r"image 1: labels \[5\]"):
        ev.update({1: {**one, "labels": torch.tensor([5])}})
    with pytest.raises(KeyError, match="category ids \\[4\\]"):
        CocoEvaluator(_gt_dict(), {0: 4})


def test_repeated_image_keeps_last_detections_and_ann_file_path_works(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_gt_dict()))
    ev = CocoEvaluator(str(path), LABEL_TO_CAT)
    ev.update(_detections(shift_frac=0.2))
    ev.update(_detections())  # same images again (e.g. DistributedSampler padding): replaced
    assert ev.summarize()["AP"] > 0.99


def test_format_table_lists_metrics_and_classes():
    ev = CocoEvaluator(_gt_dict(), LABEL_TO_CAT)
    ev.update(_detections(shift_frac=0.2))
    table = format_table(ev.summarize())
    lines = table.splitlines()
    assert lines[0].startswith("| AP | AP50 | AP75 | AP_small")
    assert lines[2].startswith("| 0.400 | 1.000 | 0.000 | n/a")
    assert "| 3 | car | 4 | 0.400 | 1.000 |" in table
    assert "| 9 | bus | 0 | n/a | n/a |" in table


def test_a_batch_of_detections_reaches_the_host_in_one_copy_with_exact_values(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    results = [{"boxes": torch.rand(n, 4, generator=gen) * 1000, "scores": torch.rand(n, generator=gen),
                "labels": torch.randint(0, 80, (n,), generator=gen)} for n in (3, 0, 5)]
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    host = CocoEvaluator.results_to_host(results)
    monkeypatch.undo()
    assert copies == [torch.Size([8, 6])]
    for got, ref in zip(host, results):  # the per-image copies it replaces, in float64 / int64
        assert torch.equal(got["boxes"], ref["boxes"].double()) and torch.equal(got["scores"], ref["scores"].double())
        assert got["labels"].dtype == torch.int64 and torch.equal(got["labels"], ref["labels"])
