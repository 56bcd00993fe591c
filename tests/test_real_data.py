"""Real data without silent errors: COCO json as common tools write it and real image files (issue 10).

Every file is written by the test with PIL (16-bit PNG, TIFFs of every mode, an EXIF-rotated JPEG); the
expected values are computed independently (hand formulas, PIL's own ImageOps.exif_transpose).
"""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from src.data.coco_dataset import CocoDetection, CorruptImageError
from src.data.coco_json import AnnotationError
from src.data.image_io import apply_orientation
from src.solver.evaluator import CocoEvaluator, available_backends

BACKENDS = available_backends()
CATS = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]


def write_json(path, images, annotations=None, categories=CATS):
    coco = {"images": images, "categories": categories}
    if annotations is not None:
        coco["annotations"] = annotations
    path.write_text(json.dumps(coco))
    return str(path)


def pixels(ds, index=0):
    """The decoded image of a dataset entry as uint8 [H, W, 3]."""
    return ds.load_image(index).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- 1: annotation ids
def _gt_and_detections(id_start=1):
    """GT with small, medium and large boxes over 3 images and detections with misses, a false positive
    and shifted boxes, so AP is well below 1 and every detection's match matters."""
    boxes = [(1, 1, [10, 10, 50, 40]), (1, 2, [100, 20, 20, 60]), (1, 1, [120, 100, 60, 30]),
             (2, 1, [5, 5, 100, 80]), (2, 2, [150, 60, 30, 70]), (2, 1, [60, 120, 20, 20]),
             (3, 2, [40, 40, 25, 50]), (3, 1, [70, 40, 120, 100]), (3, 2, [10, 120, 12, 18])]
    anns = [{"id": i + id_start, "image_id": im, "category_id": c, "bbox": list(map(float, b)),
             "area": float(b[2] * b[3]), "iscrowd": 0} for i, (im, c, b) in enumerate(boxes)]
    gt = {"images": [{"id": i, "width": 200, "height": 160, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
          "categories": CATS, "annotations": anns}
    rng = np.random.default_rng(0)
    dets = {}
    for k, (im, c, (x, y, w, h)) in enumerate(boxes):
        if k == 4:
            continue  # a miss
        dx = rng.uniform(-0.15, 0.15) * w
        r = dets.setdefault(im, {"boxes": [], "scores": [], "labels": []})
        r["boxes"].append([x + dx, y, x + dx + w, y + h])
        r["scores"].append(float(rng.uniform(0.3, 0.95)))
        r["labels"].append(c - 1)
    dets[1]["boxes"].append([150.0, 130.0, 190.0, 155.0])  # a false positive with a high score
    dets[1]["scores"].append(0.99)
    dets[1]["labels"].append(0)
    dets = {im: {k: torch.tensor(v) for k, v in r.items()} for im, r in dets.items()}
    return gt, dets


def _summary(gt, dets, backend, **kw):
    ev = CocoEvaluator(gt, {0: 1, 1: 2}, backend=backend, **kw)
    ev.update(dets)
    return ev.summarize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_annotation_ids_starting_at_0_give_the_same_ap_as_ids_from_1(backend):
    gt1, dets = _gt_and_detections(id_start=1)
    gt0, _ = _gt_and_detections(id_start=0)
    gt_big, _ = _gt_and_detections(id_start=1000)
    ref = _summary(gt1, dets, backend)
    assert 0.2 < ref["AP"] < 0.9
    for gt in (gt0, gt_big):
        s = _summary(gt, dets, backend)
        for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100"):
            assert s[k] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k
        assert [c["AP"] for c in s["per_class"]] == pytest.approx([c["AP"] for c in ref["per_class"]])


@pytest.mark.skipif("pycocotools" not in BACKENDS, reason="needs pycocotools")
def test_the_library_alone_scores_ids_from_0_lower_which_the_renumbering_prevents():
    """The reference for the test above: pycocotools on the raw json (no renumbering) loses the match of
    annotation 0 (its id doubles as 'unmatched'), so the renumbering is what keeps AP right."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def raw_ap(gt, dets):
        rows = [[im, *(b[:2].tolist() + (b[2:] - b[:2]).tolist()), s, l + 1]
                for im, r in dets.items() for b, s, l in zip(r["boxes"].double(), r["scores"].tolist(),
                                                             r["labels"].tolist())]
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = json.loads(json.dumps(gt))
            coco.createIndex()
            e = COCOeval(coco, coco.loadRes(np.array(rows)), "bbox")
            e.evaluate()
            e.accumulate()
            e.summarize()
        return e.stats[0]

    gt1, dets = _gt_and_detections(id_start=1)
    gt0, _ = _gt_and_detections(id_start=0)
    ours = _summary(gt0, dets, "pycocotools")["AP"]
    assert raw_ap(gt1, dets) == pytest.approx(ours, abs=1e-12)
    assert raw_ap(gt0, dets) < ours - 0.01


def test_same_ap_whatever_the_annotation_ids_on_real_looking_images(tmp_path):
    """Synthetic roadside images (rendered, real-looking, crowd regions included) through CocoDetection and
    the evaluator from the json file, with ids from 1, from 0 (labelme2coco) and shuffled large ids."""
    from src.data.synthetic_roadside import generate_dataset

    generate_dataset(str(tmp_path / "d"), num_train=1, num_val=3, width=160, height=96, seed=3,
                     min_objects=6, max_objects=10, image_format="png")
    ann_path = tmp_path / "d" / "annotations" / "instances_val.json"
    coco = json.loads(ann_path.read_text())
    ds = CocoDetection(str(tmp_path / "d" / "images" / "val"), str(ann_path))
    rng = np.random.default_rng(1)
    dets = {}
    for i in range(len(ds)):  # a detector's output: jittered targets with random scores, one miss per image
        t = ds.load_target(i)
        b = t["boxes"].as_subclass(torch.Tensor)[1:]
        b = b + torch.from_numpy(rng.normal(0, 1.5, b.shape)).float()
        dets[t["image_id"]] = {"boxes": b, "scores": torch.from_numpy(rng.uniform(0.2, 1.0, len(b))).float(),
                               "labels": t["labels"][1:]}
    results = []
    anns = coco["annotations"]
    for ids in (range(1, len(anns) + 1), range(len(anns)), rng.permutation(len(anns)) * 7 + 100):
        for a, new_id in zip(anns, ids):
            a["id"] = int(new_id)
        path = tmp_path / f"ids_{len(results)}.json"
        path.write_text(json.dumps(coco))
        ev = CocoEvaluator(str(path), ds.label_to_category_id)
        ev.update(dets)
        results.append(ev.summarize())
    assert 0.05 < results[0]["AP"] < 0.95
    for s in results[1:]:
        for k in ("AP", "AP50", "AP_small", "AP_medium", "AR100"):
            assert s[k] == pytest.approx(results[0][k], abs=1e-12, nan_ok=True), k


# ----------------------------------------------------------------------------- 6: missing area
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_area_is_filled_from_the_box_for_evaluation(backend):
    gt, dets = _gt_and_detections()
    without = json.loads(json.dumps(gt))
    for a in without["annotations"]:
        del a["area"]
    with_area, no_area = _summary(gt, dets, backend), _summary(without, dets, backend)
    assert not np.isnan(with_area["AP_small"]) and not np.isnan(with_area["AP_large"])
    for k in ("AP", "AP_small", "AP_medium", "AP_large", "AR_small", "AR_medium", "AR_large"):
        assert no_area[k] == pytest.approx(with_area[k], abs=1e-12, nan_ok=True), k


def test_missing_area_in_training_and_evaluation_is_the_clipped_box_area(tmp_path):
    from src.data.coco_json import coco_gt_for_eval

    img = tmp_path / "001.png"
    Image.new("RGB", (64, 48)).save(img)
    anns = [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 20]},     # clipped to 14 x 8
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 5], "area": 7.0}]
    ann = write_json(tmp_path / "a.json", [{"id": 1, "file_name": "001.png", "width": 64, "height": 48}], anns)
    ds = CocoDetection(str(tmp_path), ann)
    assert ds.load_target(0)["area"].tolist() == [112.0, 7.0]
    gt, _ = coco_gt_for_eval(json.loads(open(ann).read()))
    assert [a["area"] for a in gt["annotations"]] == [112.0, 7.0]
    assert [(a["id"], a["source_id"]) for a in gt["annotations"]] == [(1, 0), (2, 1)]


# ----------------------------------------------------------------------------- 7: no annotations
def test_json_without_annotations_is_refused_and_allow_unlabelled_accepts_it_for_inference(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "001.png")
    ann = write_json(tmp_path / "unlabelled.json", [{"id": 1, "file_name": "001.png", "width": 64, "height": 48}])
    with pytest.raises(AnnotationError, match=r"unlabelled\.json.*no 'annotations' list.*allow_unlabelled: true"):
        CocoDetection(str(tmp_path), ann)
    ds = CocoDetection(str(tmp_path), ann, allow_unlabelled=True)
    assert not ds.labelled and len(ds) == 1 and ds[0][1]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match=r"unlabelled\.json.*no 'annotations'.*not evaluated"):
        CocoEvaluator(ann, ds.label_to_category_id)
    labelled = write_json(tmp_path / "labelled.json", [{"id": 1, "file_name": "001.png", "width": 64, "height": 48}], [])
    assert CocoDetection(str(tmp_path), labelled, allow_unlabelled=True).labelled


# ----------------------------------------------------------------------------- 4: PIL modes
def _one_image_dataset(tmp_path, pil, name):
    pil.save(tmp_path / name)
    ann = write_json(tmp_path / f"{name}.json", [{"id": 1, "file_name": name, "width": pil.width,
                                                   "height": pil.height}], [])
    ds = CocoDetection(str(tmp_path), ann)
    with Image.open(tmp_path / name) as reread:
        mode = reread.mode
    return pixels(ds), mode


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    v16 = np.array([[0, 257, 25700, 65535], [32896, 12850, 1000, 64000]], dtype=np.uint16)
    rgb, mode = _one_image_dataset(tmp_path, Image.fromarray(v16), "grey16.png")
    assert mode in ("I;16", "I")  # depends on the Pillow version; both must scale the same
    expected = np.floor(v16 / 257.0 + 0.5).astype(np.uint8)  # [[0, 1, 100, 255], [128, 50, 4, 249]]
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert (rgb == expected[:, :, None]).all()
    assert expected.tolist() == [[0, 1, 100, 255], [128, 50, 4, 249]]


def test_32_bit_integer_and_float_tiffs_use_the_16_bit_and_unit_ranges(tmp_path, caplog):
    ints = np.array([[0, 25700, 65535, 70000]], dtype=np.int32)
    with caplog.at_level(logging.WARNING, logger="src.data.coco_dataset"):
        rgb, mode = _one_image_dataset(tmp_path, Image.fromarray(ints, mode="I"), "int32.tif")
    assert mode == "I" and rgb[0, :, 0].tolist() == [0, 100, 255, 255]
    assert "outside the expected [0, 65535]" in caplog.text  # 70000 was clipped, and said so
    floats = np.array([[0.0, 0.2, 0.5, 1.0]], dtype=np.float32)
    rgb, mode = _one_image_dataset(tmp_path, Image.fromarray(floats, mode="F"), "float.tif")
    assert mode == "F" and rgb[0, :, 1].tolist() == [0, 51, 128, 255]


def test_alpha_and_palette_transparency_are_composited_over_black(tmp_path):
    la = Image.fromarray(np.array([[[200, 255], [200, 128], [200, 0], [10, 51]]], dtype=np.uint8), mode="LA")
    rgb, mode = _one_image_dataset(tmp_path, la, "grey_alpha.png")
    expected = [(200 * 255 + 127) // 255, (200 * 128 + 127) // 255, 0, (10 * 51 + 127) // 255]
    assert mode == "LA" and rgb[0, :, 2].tolist() == expected == [200, 100, 0, 2]
    p = Image.fromarray(np.array([[0, 1, 2, 1]], dtype=np.uint8), mode="P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    p.info["transparency"] = 1  # palette index 1 (green) is transparent
    rgb, mode = _one_image_dataset(tmp_path, p, "palette.png")
    assert mode == "P" and rgb[0].tolist() == [[255, 0, 0], [0, 0, 0], [0, 0, 255], [0, 0, 0]]


def test_cmyk_is_converted_multiplicatively(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 0, 128], [51, 102, 153, 204]]], dtype=np.uint8)
    rgb, mode = _one_image_dataset(tmp_path, Image.fromarray(cmyk, mode="CMYK"), "cmyk.tif")
    c = cmyk.astype(np.int64)
    expected = ((255 - c[..., :3]) * (255 - c[..., 3:]) + 127) // 255  # R = 255 (1 - C)(1 - K)
    assert mode == "CMYK" and rgb.tolist() == expected.tolist()
    assert rgb[0, 2].tolist() == [127, 63, 127]  # (older Pillow's convert('RGB') subtracted: [127, 0, 127])


# ----------------------------------------------------------------------------- 5: EXIF orientation
def _exif_jpeg(path, w=40, h=30, orientation=6):
    """A JPEG stored as w x h with a red block in its stored top-left corner and the given EXIF tag."""
    a = np.full((h, w, 3), 40, dtype=np.uint8)
    a[:10, :16] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=98, exif=exif.tobytes())


def test_exif_orientation_is_applied_when_the_json_gives_the_displayed_size(tmp_path):
    _exif_jpeg(tmp_path / "phone.jpg")  # stored 40x30, orientation 6: displayed 30x40
    with Image.open(tmp_path / "phone.jpg") as pil:
        displayed = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
        stored = np.asarray(pil.convert("RGB"))
    assert displayed.shape == (40, 30, 3)
    as_labelme = write_json(tmp_path / "labelme.json", [{"id": 1, "file_name": "phone.jpg", "width": 30, "height": 40}], [])
    np.testing.assert_array_equal(pixels(CocoDetection(str(tmp_path), as_labelme)), displayed)
    as_stored = write_json(tmp_path / "stored.json", [{"id": 1, "file_name": "phone.jpg", "width": 40, "height": 30}], [])
    np.testing.assert_array_equal(pixels(CocoDetection(str(tmp_path), as_stored)), stored)


def test_exif_orientation_is_applied_to_a_square_image_as_labelme_does(tmp_path):
    _exif_jpeg(tmp_path / "sq.jpg", w=32, h=32, orientation=8)
    with Image.open(tmp_path / "sq.jpg") as pil:
        displayed = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
    ann = write_json(tmp_path / "a.json", [{"id": 1, "file_name": "sq.jpg", "width": 32, "height": 32}], [])
    np.testing.assert_array_equal(pixels(CocoDetection(str(tmp_path), ann)), displayed)


def test_size_mismatch_error_names_exif_when_the_file_has_the_tag(tmp_path):
    _exif_jpeg(tmp_path / "phone.jpg")
    Image.new("RGB", (40, 30)).save(tmp_path / "plain.jpg")
    ann = write_json(tmp_path / "a.json", [{"id": 7, "file_name": "phone.jpg", "width": 50, "height": 50}], [])
    with pytest.raises(CorruptImageError, match=r"phone\.jpg' \(image id 7\) is stored as 40x30 with EXIF "
                                                r"orientation 6 \(displayed 30x40\), but the json says 50x50"):
        CocoDetection(str(tmp_path), ann)
    ann = write_json(tmp_path / "b.json", [{"id": 8, "file_name": "plain.jpg", "width": 30, "height": 40}], [])
    with pytest.raises(CorruptImageError, match=r"plain\.jpg' \(image id 8\) is 40x30 but the json says 30x40") as e:
        CocoDetection(str(tmp_path), ann)
    assert "EXIF" not in str(e.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil_exif_transpose(tmp_path, orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pil = Image.fromarray(a)
    exif = pil.getexif()
    exif[0x0112] = orientation
    pil.save(tmp_path / "x.png", exif=exif.tobytes())
    with Image.open(tmp_path / "x.png") as reread:
        expected = np.asarray(ImageOps.exif_transpose(reread).convert("RGB"))
    np.testing.assert_array_equal(apply_orientation(a, orientation), expected)


# ----------------------------------------------------------------------------- 10: headers at construction
def test_every_header_is_checked_at_construction_in_parallel_and_the_error_lists_the_bad_ones(tmp_path):
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": 8, "height": 6} for i in range(80)]
    for im in images:
        Image.new("RGB", (8, 6), (im["id"], 0, 0)).save(tmp_path / im["file_name"])
    os.remove(tmp_path / "013.png")
    Image.new("RGB", (6, 8)).save(tmp_path / "071.png")
    ann = write_json(tmp_path / "a.json", images, [])
    with pytest.raises(CorruptImageError) as e:
        CocoDetection(str(tmp_path), ann)
    msg = str(e.value)
    assert "2 of 80 images" in msg and "013.png' (image id 13) is missing" in msg
    assert "071.png' (image id 71) is 6x8 but the json says 8x6" in msg


# ----------------------------------------------------------------------------- 11: data errors are not config errors
def test_an_error_inside_the_annotation_json_is_a_data_error_naming_the_json_not_the_yaml(tmp_path, capsys):
    import train
    from src.core import ConfigError, YAMLConfig

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    bad = write_json(tmp_path / "instances_bad.json", [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
                     [{"id": 1, "image_id": 1, "category_id": 77, "bbox": [1, 1, 5, 5]}])
    paths = {"img_folder": str(tmp_path), "ann_file": bad}
    cfg = YAMLConfig("configs/coco_custom_example.yaml", overrides={"train_dataloader": {"dataset": paths}})
    with pytest.raises(AnnotationError) as e:
        cfg.build_spec(cfg["train_dataloader"]["dataset"], ("train_dataloader", "dataset"))
    assert not isinstance(e.value, ConfigError) and "instances_bad.json" in str(e.value)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps({"__include__": [os.path.abspath("configs/coco_custom_example.yaml")],
                                    "output_dir": str(tmp_path / "out"), "input_size": [64, 64],
                                    "train_dataloader": {"dataset": paths}, "val_dataloader": {"dataset": paths}}))
    assert train.main(["-c", str(cfg_file), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data error: ") and "instances_bad.json" in err and "category_id 77" in err
    assert "config error" not in err and "run.yaml" not in err
