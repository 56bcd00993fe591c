"""Large jsons: the column read of the annotations, the evaluation ground truth taken from the dataset's parse
(no second read of the json), and the image-header cache. Each checked against a per-annotation reference or
against the path that reads the json."""
import builtins
import gc
import json
import math

import numpy as np
import pytest
import torch

from src.data.coco_dataset import CocoDetection
from src.data.coco_json import annotation_columns
from src.solver.evaluator import CocoEvaluator, available_backends, evaluator_for
from tests.test_data import img_entry, write_coco

CATS = [{"id": 7, "name": "car"}, {"id": 3, "name": "truck"}]
W, H = 64, 48


def _random_anns(n, seed=0, id_start=0):
    """Boxes inside, partly outside, zero-width and crowd, on 4 images of 64 x 48; areas as written or absent."""
    rng = np.random.default_rng(seed)
    anns = []
    for k in range(n):
        x, y = rng.uniform(-8, W - 4), rng.uniform(-8, H - 4)
        w, h = rng.uniform(1, 30), rng.uniform(1, 25)
        if k % 11 == 3:
            w = 0.0
        ann = {"id": id_start + k, "image_id": int(rng.integers(1, 5)), "category_id": int(rng.choice([3, 7])),
               "bbox": [round(x, 2), round(y, 2), round(w, 2), int(h)], "iscrowd": int(k % 13 == 5)}
        if k % 3:
            ann["area"] = round(w * h, 1)
        anns.append(ann)
    return anns


def _reference_columns(anns, image_index, category_index):
    """Per annotation, as the dataset read them before the column passes."""
    def area(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    return (np.array([image_index[a["image_id"]] for a in anns]),
            np.array([category_index[a["category_id"]] for a in anns]),
            np.array([[float(v) for v in a["bbox"]] for a in anns]).reshape(-1, 4),
            np.array([int(a.get("iscrowd", 0)) for a in anns]),
            np.array([area(a.get("area")) for a in anns]))


@pytest.mark.parametrize("variant", ["plain", "string_bbox", "no_iscrowd_key", "area_null_and_string", "bool_crowd"])
def test_annotation_columns_equal_a_per_annotation_reference(variant):
    anns = _random_anns(60)
    if variant == "string_bbox":
        anns[4]["bbox"] = [str(v) for v in anns[4]["bbox"]]
    elif variant == "no_iscrowd_key":
        del anns[7]["iscrowd"]
    elif variant == "area_null_and_string":
        anns[1]["area"], anns[2]["area"] = None, "12.5"
    elif variant == "bool_crowd":
        anns[0]["iscrowd"] = True
    image_index, category_index = {i: i - 1 for i in range(1, 5)}, {3: 0, 7: 1}
    cols = annotation_columns(anns, image_index, category_index, "a.json")
    image, category, xywh, crowd, area = _reference_columns(anns, image_index, category_index)
    np.testing.assert_array_equal(cols.image_index, image)
    np.testing.assert_array_equal(cols.category_index, category)
    np.testing.assert_array_equal(cols.xywh, xywh)
    np.testing.assert_array_equal(cols.iscrowd, crowd)
    np.testing.assert_array_equal(cols.area, area)   # NaN where missing, null or a string
    strings = variant == "string_bbox"
    assert int(cols.string_rows.sum()) == strings and cols.string_rows[4] == strings


def test_dataset_targets_equal_a_per_box_reference(tmp_path):
    anns = _random_anns(80, seed=1)
    img_dir, ann = write_coco(tmp_path, [img_entry(i, W, H) for i in range(1, 5)], anns, CATS, make_files=False)
    ds = CocoDetection(img_dir, ann, check_images=False)
    for index, image_id in enumerate(ds.image_ids):
        boxes, labels, areas = [], [], []
        for a in anns:   # clip to the image, drop what has no area left, crowd regions are no targets
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = min(max(x, 0), W), min(max(y, 0), H), min(max(x + w, 0), W), min(max(y + h, 0), H)
            if a["image_id"] != image_id or a["iscrowd"] or x2 <= x1 or y2 <= y1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append({3: 0, 7: 1}[a["category_id"]])
            areas.append(a["area"] if "area" in a else (x2 - x1) * (y2 - y1))
        target = ds.load_target(index)
        np.testing.assert_allclose(target["boxes"].as_subclass(torch.Tensor).numpy(), np.array(boxes).reshape(-1, 4),
                                   rtol=1e-6)
        assert target["labels"].tolist() == labels
        np.testing.assert_allclose(target["area"].numpy(), np.array(areas), rtol=1e-6)


@pytest.mark.parametrize("was_enabled", [True, False])
def test_the_collector_is_paused_while_reading_and_restored_after(tmp_path, was_enabled):
    img_dir, ann = write_coco(tmp_path, [img_entry(i, W, H) for i in range(1, 5)], _random_anns(5), CATS,
                              make_files=False)
    (gc.enable if was_enabled else gc.disable)()
    try:
        CocoDetection(img_dir, ann, check_images=False)
        assert gc.isenabled() == was_enabled
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- evaluator from the parse
def _detections(anns, noisy, seed=0):
    """The usable non-crowd gt boxes (clipped) as detections; `noisy`: shifted, some missed, random scores."""
    rng = np.random.default_rng(seed)
    dets = {}
    for k, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if a["iscrowd"] or x2 <= x1 or y2 <= y1 or (noisy and k % 5 == 0):
            continue
        dx = rng.uniform(-0.2, 0.2) * (x2 - x1) if noisy else 0.0
        r = dets.setdefault(a["image_id"], {"boxes": [], "scores": [], "labels": []})
        r["boxes"].append([x1 + dx, y1, x2 + dx, y2])
        r["scores"].append(float(rng.uniform(0.2, 1.0)) if noisy else 1.0)
        r["labels"].append({3: 0, 7: 1}[a["category_id"]])
    return {i: {k: torch.tensor(v) for k, v in r.items()} for i, r in dets.items()}


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (undefined metrics)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _summarize(evaluator, dets):
    evaluator.update(dets)
    return evaluator.summarize()


def _no_second_read(monkeypatch, path):
    real_open, real_load = builtins.open, json.load

    def guarded_open(file, *args, **kwargs):
        assert str(file) != str(path), "the annotation json was opened again"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load called"))
    return real_load


@pytest.mark.parametrize("backend", available_backends())
def test_the_evaluator_from_the_parsed_ground_truth_scores_as_the_json_and_reads_no_file(tmp_path, monkeypatch,
                                                                                         backend):
    anns = _random_anns(90, seed=2)   # ids from 0, crowd, clipped and zero-width boxes, missing areas
    img_dir, ann = write_coco(tmp_path, [img_entry(i, W, H) for i in range(1, 5)], anns, CATS, make_files=False)
    ds = CocoDetection(img_dir, ann, check_images=False)
    from_json = {noisy: _summarize(CocoEvaluator(ann, ds.label_to_category_id, backend=backend),
                                   _detections(anns, noisy)) for noisy in (False, True)}
    _no_second_read(monkeypatch, ann)
    for noisy in (False, True):
        summary = _summarize(CocoEvaluator(ds.eval_ground_truth(), ds.label_to_category_id, backend=backend),
                             _detections(anns, noisy))
        assert _same(summary, from_json[noisy])
    assert from_json[False]["AP"] == pytest.approx(1.0) and 0.2 < from_json[True]["AP"] < 0.9
    assert from_json[True]["gt_fixes"]["degenerate_dropped"] > 0 and from_json[True]["gt_fixes"]["clipped"] > 0
    crowd = sum(a["iscrowd"] for a in anns)
    assert sum(c["num_gt"] for c in from_json[True]["per_class"]) < len(anns) - crowd   # zero-width ones left out


def test_evaluator_for_builds_from_the_dataset_once_and_skipped_images_stay_out(tmp_path, monkeypatch):
    anns = _random_anns(60, seed=3)
    img_dir, ann = write_coco(tmp_path, [img_entry(i, W, H) for i in range(1, 5)], anns, CATS)
    (tmp_path / "images" / "003.jpg").unlink()
    ds = CocoDetection(img_dir, ann, skip_corrupt=True)
    assert ds.image_ids == [1, 2, 4]
    dets = {i: d for i, d in _detections(anns, noisy=True).items() if i != 3}
    expected = _summarize(CocoEvaluator(ann, ds.label_to_category_id, image_ids=ds.image_ids), dets)
    _no_second_read(monkeypatch, ann)
    evaluator = evaluator_for(ds, ds.classes)
    summary = _summarize(evaluator, dets)
    for key in ("AP", "AP50", "AR100", "per_class", "gt_fixes", "num_images", "num_detections"):
        assert _same(summary[key], expected[key]), key
    index = evaluator.coco_gt
    evaluator.reset()
    assert _summarize(evaluator, dets)["AP"] == expected["AP"] and evaluator.coco_gt is index   # built once


def test_an_unlabelled_dataset_cannot_be_evaluated_and_the_error_names_the_json(tmp_path):
    img_dir, _ = write_coco(tmp_path, [img_entry(1)], [], CATS, make_files=False)
    ann = tmp_path / "list.json"
    ann.write_text(json.dumps({"images": [img_entry(1)], "categories": CATS}))
    ds = CocoDetection(img_dir, str(ann), check_images=False, allow_unlabelled=True)
    with pytest.raises(ValueError, match=r"list\.json.*no 'annotations'.*not evaluated"):
        evaluator_for(ds, ds.classes)


# ----------------------------------------------------------------------------- header cache
def _counting_reads(monkeypatch):
    """Count the image files whose header is read (src.data.image_io.read_header)."""
    import src.data.image_io as image_io
    opened = []
    real = image_io.read_header
    monkeypatch.setattr(image_io, "read_header", lambda path: opened.append(path) or real(path))
    return opened


def _cached_set(tmp_path, n=70):
    images = [img_entry(i, W, H) for i in range(1, n + 1)]
    img_dir, ann = write_coco(tmp_path, images, [], CATS)
    return img_dir, ann, str(tmp_path / "cache")


def test_a_second_start_opens_no_image_file_and_a_changed_mtime_or_size_is_read_again(tmp_path, monkeypatch):
    import os
    from PIL import Image
    img_dir, ann, cache = _cached_set(tmp_path)
    opened = _counting_reads(monkeypatch)
    CocoDetection(img_dir, ann, header_cache=cache)
    assert len(opened) == 70 and len(os.listdir(cache)) == 1
    opened.clear()
    ds = CocoDetection(img_dir, ann, header_cache=cache)
    assert opened == [] and len(ds) == 70
    touched, rewritten = os.path.join(img_dir, "005.jpg"), os.path.join(img_dir, "009.jpg")
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))          # mtime only
    st = os.stat(rewritten)
    Image.new("RGB", (W, H), (1, 2, 3)).save(rewritten, quality=20)              # size only: mtime put back
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(rewritten).st_size != st.st_size
    opened.clear()
    CocoDetection(img_dir, ann, header_cache=cache)
    assert sorted(opened) == [touched, rewritten]
    Image.new("RGB", (W + 1, H)).save(touched)   # a changed file is checked again, never taken from the cache
    with pytest.raises(Exception, match=r"005\.jpg' \(image id 5\) is 65x48 but the json says 64x48"):
        CocoDetection(img_dir, ann, header_cache=cache)


@pytest.mark.parametrize("damage", ["not json", "wrong structure", "bad entries"])
def test_a_cache_with_bad_content_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    import os
    img_dir, ann, cache = _cached_set(tmp_path)
    CocoDetection(img_dir, ann, header_cache=cache)
    (file,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    data = json.loads(open(file).read())
    if damage == "not json":
        open(file, "w").write(open(file).read()[:-20])
    elif damage == "wrong structure":
        open(file, "w").write(json.dumps([data]))
    else:   # a width that is a string, an entry of 3 values, an EXIF orientation out of 1..8
        paths = sorted(data["headers"])
        data["headers"][paths[0]][2] = "64"
        data["headers"][paths[1]] = [1, 2, 3]
        data["headers"][paths[2]][5] = 9
        open(file, "w").write(json.dumps(data))
    opened = _counting_reads(monkeypatch)
    with caplog.at_level("WARNING", logger="src.data.image_io"):
        CocoDetection(img_dir, ann, header_cache=cache)
    assert len(opened) == (3 if damage == "bad entries" else 70)
    assert ("3 malformed entries ignored" if damage == "bad entries" else "cannot be used") in caplog.text
    opened.clear()
    CocoDetection(img_dir, ann, header_cache=cache)   # rewritten whole
    assert opened == []


def test_header_cache_off_reads_every_header_and_writes_nothing(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    img_dir, ann, _ = _cached_set(tmp_path)
    opened = _counting_reads(monkeypatch)
    for _ in range(2):
        CocoDetection(img_dir, ann, header_cache=False)
    assert len(opened) == 140 and not os.path.exists(tmp_path / "xdg")
    with pytest.raises(ValueError, match="header_cache"):
        CocoDetection(img_dir, ann, header_cache=3)


def test_parallel_probe_keeps_the_order_and_reports_each_file(tmp_path):
    import os
    from src.data.image_io import HeaderCache, probe_headers, read_header
    img_dir, _, _ = _cached_set(tmp_path, n=40)
    paths = [os.path.join(img_dir, f"{i:03d}.jpg") for i in range(1, 41)]
    paths[13] = os.path.join(img_dir, "gone.jpg")
    open(paths[21], "wb").write(b"not an image")
    cache = HeaderCache(str(tmp_path / "c.json"))
    for _ in range(2):   # cold, then from the cache
        got = probe_headers(paths, max_workers=4, cache=cache, chunk=3)
        for k, (header, problem) in enumerate(got):
            if k == 13:
                assert header is None and problem == "is missing"
            elif k == 21:
                assert header is None and problem.startswith("cannot be read as an image")
            else:
                assert problem is None and header == read_header(paths[k])
    assert cache.hits == 38


def test_the_default_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    img_dir, ann, _ = _cached_set(tmp_path, n=3)
    CocoDetection(img_dir, ann)
    files = os.listdir(tmp_path / "xdg" / "dset-rtdetr" / "image_headers")
    assert len(files) == 1 and files[0].startswith("ann-") and files[0].endswith(".json")


def test_the_bench_generator_writes_a_valid_json_the_dataset_reads(tmp_path):
    from bench.data_bench import make_image_links, write_large_coco_json
    ann = str(tmp_path / "big.json")
    n = write_large_coco_json(ann, num_images=300, boxes_per_image=4, seed=1)
    data = json.loads(open(ann).read())
    assert len(data["images"]) == 300 and len(data["annotations"]) == n and 900 < n < 1500
    assert [a["id"] for a in data["annotations"]] == list(range(1, n + 1))
    make_image_links(str(tmp_path / "images"), 300)
    ds = CocoDetection(str(tmp_path / "images"), ann, header_cache=False)   # every header checked: 1920x1080
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert ds.box_stats["kept"] == n - crowd and ds.box_stats["clipped"] == 0


def test_images_that_got_no_prediction_are_left_out_of_the_ap_and_reported(tmp_path, capsys):
    """An image that failed to load during the evaluation (skip_corrupt at load time) gets no update: its boxes
    must not count as missed (a silently lower AP); the summary names it."""
    anns = _random_anns(60, seed=5)
    img_dir, ann = write_coco(tmp_path, [img_entry(i, W, H) for i in range(1, 5)], anns, CATS)
    ds = CocoDetection(img_dir, ann)
    dets = {i: d for i, d in _detections(anns, noisy=True).items() if i != 3}
    full = CocoEvaluator(ann, ds.label_to_category_id)
    got = _summarize(full, dets)
    subset = _summarize(CocoEvaluator(ann, ds.label_to_category_id, image_ids=[1, 2, 4]), dets)
    for key in ("AP", "AP50", "AR100", "per_class"):
        assert _same(got[key], subset[key]), key
    assert got["images_not_evaluated"] == {"count": 1, "first_ids": [3]} and "images_not_evaluated" not in subset
    assert "1 of 4 val image(s) got no prediction" in capsys.readouterr().out
