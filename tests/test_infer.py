"""tools/infer.py: PNG + COCO-results json per folder, boxes in original-image pixels exactly as the evaluation
path (val dataset + collate + eval_scale_sizes + postprocessor) computes them."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers_tiny_run import make_tiny_dataset, tiny_config_dict
from src.misc.visualize import patch_rects, rects_mask
from src.solver.trainer import eval_scale_sizes
from tools import infer


def test_to_original_maps_padded_normalised_boxes_to_file_pixels():
    # content resized 300x200 -> 150x100, padded to 160x128: x_norm * 160 is an input pixel, * 300/150 original
    scale = infer.to_original((128, 160), (150, 100), (300, 200))
    assert scale.tolist() == [320.0, 256.0]
    # and the trainer's evaluation formula agrees
    t = [{"orig_size": torch.tensor([300, 200]), "size": torch.tensor([150, 100])}]
    assert eval_scale_sizes(t, (128, 160))[0].tolist() == [320.0, 256.0]


def test_patch_rects_and_mask_of_a_partial_last_column():
    # grid 2 x 3 of 8 px patches, image 16 x 20: the last column is 4 px wide
    rects = patch_rects(torch.tensor([2, 3]), (2, 3), (8, 8), (16, 20))
    assert rects.tolist() == [[16.0, 0.0, 20.0, 8.0], [0.0, 8.0, 8.0, 16.0]]
    mask = rects_mask(rects, (16, 20))
    assert mask.sum() == 4 * 8 + 8 * 8 and mask[0, 19] and mask[15, 0] and not mask[0, 0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    data = make_tiny_dataset(tmp / "data", width=200, height=150)  # val Resize to 160x96 really rescales
    cfg = tiny_config_dict(data, tmp / "out", dset=True)
    path = tmp / "dset.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    from src.zoo.rtdetr.deploy import load_detector

    model = load_detector(str(path), random_weights=True)[1]
    ckpt = tmp / "weights.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return tmp, data, path, ckpt


def test_infer_writes_png_and_coco_json_with_boxes_as_the_evaluation_path(tiny):
    tmp, data, cfg_path, ckpt = tiny
    src = tmp / "images"
    src.mkdir()
    # two synthetic val images, one of them resized to an odd size (the mapping must undo any input size)
    val = sorted((data / "images" / "val").iterdir())
    Image.open(val[0]).save(src / val[0].name)
    Image.open(val[1]).resize((131, 97)).save(src / "odd.png")
    args = SimpleNamespace(config=str(cfg_path), resume=str(ckpt), random_weights=False, input=str(src),
                           out=str(tmp / "pred"), score=0.0, update=[], device="cpu", trust_checkpoint=False)
    res = infer.run(args)
    out = tmp / "pred"
    for name in (val[0].stem, "odd"):
        png = np.asarray(Image.open(out / f"{name}.png"))
        assert png.ndim == 3 and png.shape[0] > 100 and png.std() > 0
    images = json.loads((out / "images.json").read_text())
    dets = json.loads((out / "detections.json").read_text())
    coco = json.loads((data / "annotations" / "instances_val.json").read_text())
    known = {im["file_name"]: im["id"] for im in coco["images"]}
    by_name = {im["file_name"]: im for im in images}
    assert by_name[val[0].name]["id"] == known[val[0].name]               # id from the val annotation file
    assert by_name["odd.png"]["id"] not in known.values()                  # a new id for an unknown file
    assert (by_name["odd.png"]["width"], by_name["odd.png"]["height"]) == (131, 97)
    assert dets == res["detections"] and len(dets) == 2 * 20                # num_top_queries 20, score 0
    cat_ids = {c["id"] for c in coco["categories"]}
    for d in dets:
        assert set(d) == {"image_id", "file_name", "category_id", "bbox", "score"}
        assert d["category_id"] in cat_ids and len(d["bbox"]) == 4
        im = by_name[d["file_name"]]
        x, y, w, h = d["bbox"]
        assert -0.5 <= x and x + w <= im["width"] * 1.5 and w >= 0 and h >= 0

    # independent reference: the evaluation path (val dataset, collate, eval_scale_sizes, postprocessor)
    from src.zoo.rtdetr.deploy import load_detector

    cfg, model, post = load_detector(str(cfg_path), checkpoint=str(ckpt))
    dataset = cfg.build_spec(cfg["val_dataloader"]["dataset"], ("val",))
    collate = cfg.build_spec(cfg["val_dataloader"]["collate_fn"], ("val",))
    index = dataset.image_ids.index(known[val[0].name])
    images_t, targets = collate([dataset[index]])
    with torch.no_grad():
        ref = post(model(images_t), eval_scale_sizes(targets, images_t.shape[-2:]))[0]
    mine = [d for d in dets if d["file_name"] == val[0].name]
    got = torch.tensor([d["bbox"] for d in mine])
    ref_xywh = torch.cat([ref["boxes"][:, :2], ref["boxes"][:, 2:] - ref["boxes"][:, :2]], 1)
    torch.testing.assert_close(got, ref_xywh, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.tensor([d["score"] for d in mine]), ref["scores"], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_infer_on_cuda_matches_cpu(tiny):
    tmp, data, cfg_path, ckpt = tiny
    val = sorted((data / "images" / "val").iterdir())[0]
    runs = {}
    for device in ("cpu", "cuda"):
        args = SimpleNamespace(config=str(cfg_path), resume=str(ckpt), random_weights=False, input=str(val),
                               out=str(tmp / f"pred_{device}"), score=0.0, update=[], device=device,
                               trust_checkpoint=False)
        runs[device] = infer.run(args)["detections"]
    cpu = torch.tensor([d["bbox"] + [d["score"]] for d in runs["cpu"]])
    gpu = torch.tensor([d["bbox"] + [d["score"]] for d in runs["cuda"]])
    torch.testing.assert_close(gpu, cpu, atol=0.05, rtol=0)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_infer_with_a_missing_or_empty_input_says_so_and_returns_2(tiny, tmp_path, capsys, case):
    _, _, cfg_path, ckpt = tiny
    target = tmp_path / "nothing_here"
    if case == "empty":
        target.mkdir()
    rc = infer.main(["-c", str(cfg_path), "-r", str(ckpt), "--input", str(target), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --input {target}: ")
    assert ("no such file or folder" if case == "missing" else "no images (") in err


def test_export_without_an_input_size_says_which_key_is_needed(tiny, tmp_path, capsys):
    from tools import export_onnx

    _, _, cfg_path, ckpt = tiny
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["input_size"] = None          # neither the one key nor the explicit size: nothing fixes the graph's size
    cfg["eval_spatial_size"] = None
    path = tmp_path / "no_size.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = export_onnx.main(["-c", str(path), "--random-weights", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "eval_spatial_size [h, w] is needed to export" in err
    assert not (tmp_path / "m.onnx").exists()


class _StubDetector(torch.nn.Module):
    """One confident query (label 2) at the normalised box cx 0.5, cy 0.5, w 0.25, h 0.5 of the padded input."""

    def forward(self, x):
        logits = torch.full((x.shape[0], 20, 5), -10.0)
        logits[:, 0, 2] = 10.0
        boxes = torch.tensor([0.5, 0.5, 0.25, 0.5]).expand(x.shape[0], 20, 4).clone()
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_infer_maps_a_known_box_to_hand_computed_pixels_of_each_original_size(tiny, tmp_path, monkeypatch):
    """A stub model with a known box, so the reference is arithmetic, not the tool's own loader: the input is
    resized to exactly 160x96 (no padding), so the box is x 60..100, y 24..72 input pixels; in an original
    of W x H pixels that is x * W / 160, y * H / 96."""
    _, data, cfg_path, ckpt = tiny
    real = infer.load_detector

    def with_stub(*args, **kwargs):
        cfg, _model, post = real(*args, **kwargs)
        return cfg, _StubDetector(), post

    monkeypatch.setattr(infer, "load_detector", with_stub)
    src = tmp_path / "images"
    src.mkdir()
    Image.new("RGB", (200, 150), (90, 90, 90)).save(src / "a.png")
    Image.new("RGB", (131, 97), (90, 90, 90)).save(src / "b.png")
    args = SimpleNamespace(config=str(cfg_path), resume=str(ckpt), random_weights=False, input=str(src),
                           out=str(tmp_path / "pred"), score=0.5, update=[], device="cpu", trust_checkpoint=False)
    dets = {d["file_name"]: d for d in infer.run(args)["detections"]}
    assert sorted(dets) == ["a.png", "b.png"]  # one detection each: the only query above 0.5
    assert dets["a.png"]["bbox"] == [75.0, 37.5, 50.0, 75.0]          # 60*200/160, 24*150/96, 40*1.25, 48*1.5625
    assert dets["b.png"]["bbox"] == pytest.approx([49.12, 24.25, 32.75, 48.5], abs=0.006)  # *131/160, *97/96
    coco = json.loads((data / "annotations" / "instances_train.json").read_text())
    assert dets["a.png"]["category_id"] == sorted(c["id"] for c in coco["categories"])[2]
    assert dets["a.png"]["score"] == pytest.approx(float(torch.sigmoid(torch.tensor(10.0))), abs=1e-5)
