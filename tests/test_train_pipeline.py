"""End to end: train.py on a tiny synthetic roadside set writes TensorBoard, checkpoints and an eval json;
--test-only on the checkpoint reproduces the AP (issues 'pipeline' and 'DSET model')."""
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers_tiny_run import make_tiny_dataset, run_train, write_tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """4 train images, batch 2, one epoch: two iterations of DSET (pruning on P4/P5, MoE, CASS)."""
    root = tmp_path_factory.mktemp("pipeline")
    data = make_tiny_dataset(root / "data")
    out = root / "out"
    cfg = write_tiny_config(root / "tiny.yaml", data, out, dset=True, augment=False,
                            extra={"dset": {"patch_size": 2, "keep_ratio": 0.3, "token_pruning_warmup_epochs": 0,
                                            "vis_interval": 1}})
    proc = run_train(["-c", str(cfg)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cfg, out, proc.stdout


def test_two_iterations_write_checkpoints_eval_json_and_log_line(tiny_run):
    _, out, stdout = tiny_run
    for name in ("last.pth", "best.pth", "log.jsonl", "eval/0.json"):
        assert (out / name).exists(), name
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "ema", "optimizer", "lr_scheduler", "scaler", "epoch", "step", "best_ap", "config",
            "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2
    ev = json.loads((out / "eval" / "0.json").read_text())
    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
        assert 0.0 <= ev[key] <= 1.0 or ev[key] != ev[key]  # NaN allowed when a bucket has no GT
    assert len(ev["per_class"]) == 5
    assert {"keep_recall_small", "keep_recall_near", "oracle_keep_recall_far", "centroid_dy"} <= set(ev["dset_bias"])
    lines = (out / "log.jsonl").read_text().strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["train"]["loss_cass"] > 0
    assert "| AP |" in stdout  # the evaluation table is printed


def test_tensorboard_has_every_loss_term_lr_grad_norm_and_the_dset_tags(tiny_run):
    _, out, _ = tiny_run
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/vfl", "loss/bbox", "loss/giou", "loss/vfl_aux_0", "loss/vfl_dn_0",
                "loss/vfl_enc_0", "loss/cass", "loss/moe_balance_encoder", "loss/moe_balance_decoder",
                "lr/backbone", "lr/default", "train/grad_norm", "train/iter_time", "dset/keep_ratio",
                "dset/kept_tokens", "cass/top_left_loss", "cass/bottom_loss", "cass/small_obj_loss",
                "eval/AP", "eval/AP50", "eval_bias/keep_recall_large", "eval_bias/centroid_dy",
                "eval_bias/P4/keep_recall_large", "eval_bias/P5/keep_recall_near",
                "moe/decoder.decoder.layers.0.moe/expert0"}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]
    assert acc.Scalars("dset/keep_ratio")[0].value == pytest.approx(0.3)
    assert {"cass/mask_level0", "cass/mask_level1"} <= set(acc.Tags()["images"])


def test_test_only_on_the_checkpoint_reproduces_the_ap(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    proc = run_train(["-c", str(cfg), "-r", str(out / "last.pth"), "--test-only", "--output-dir", str(tmp_path)],
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "eval" / "0.json").read_text())
    again = json.loads((tmp_path / "eval" / "test.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)
    assert again["dset_bias"]["keep_recall_small"] == pytest.approx(first["dset_bias"]["keep_recall_small"])


def test_test_only_evaluates_exactly_the_checkpoints_ema_weights(tiny_run, tmp_path):
    """AP is 0.0 after two steps, so equal APs alone would pass if -r loaded nothing: check the weights the
    resumed trainer evaluates against the checkpoint file, and its detections against a model loaded from
    the file by plain load_state_dict (an independent path)."""
    from src.core import YAMLConfig
    from src.solver.trainer import Trainer

    cfg_path, out, _ = tiny_run
    ckpt = torch.load(out / "last.pth", weights_only=True)
    trainer = Trainer(YAMLConfig(str(cfg_path)), output_dir=str(tmp_path), resume=str(out / "last.pth"),
                      test_only=True)
    evaluated = trainer.state.ema.module
    fresh = YAMLConfig(str(cfg_path)).model
    assert any(not torch.equal(v, ckpt["ema"]["module"][k]) for k, v in fresh.state_dict().items()
               if v.is_floating_point())  # a model that loaded nothing would differ from the file
    for k, v in evaluated.state_dict().items():
        assert torch.equal(v, ckpt["ema"]["module"][k]), k
    fresh.load_state_dict(ckpt["ema"]["module"])
    fresh.eval()
    images, _ = next(iter(trainer.val_loader))
    for m in (evaluated, fresh):
        for sub in m.modules():
            if hasattr(sub, "set_epoch") and sub is not m:
                sub.set_epoch(ckpt["epoch"])
    with torch.no_grad():
        got, ref = evaluated(images), fresh(images)
    # equal weights; the float sums may differ in the last bit (seen: 1e-4 on a logit of -5)
    torch.testing.assert_close(got["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], ref["pred_boxes"], rtol=1e-4, atol=1e-5)
    assert torch.equal(got["dset_prune_info"][0]["kept_patch_idx"], ref["dset_prune_info"][0]["kept_patch_idx"])


def _permuted_val_json(cfg_path, tmp_path):
    """The val json with its category ids permuted (names kept): (path, {original id: new id})."""
    import yaml
    ann = yaml.safe_load(open(cfg_path))["val_dataloader"]["dataset"]["ann_file"]
    coco = json.loads(open(ann).read())
    ids = sorted(c["id"] for c in coco["categories"])
    perm = dict(zip(ids, [100 + i for i in reversed(range(len(ids)))]))
    for c in coco["categories"]:
        c["id"] = perm[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = perm[a["category_id"]]
    path = tmp_path / "val_permuted.json"
    path.write_text(json.dumps(coco))
    return path, perm, ann


def test_checkpoint_classes_label_a_permuted_val_json_in_test_only_and_infer(tiny_run, tmp_path):
    """The checkpoint stores the training classes; --test-only and tools/infer.py on a val json whose
    category ids are permuted score and name every class by name, not by id or position."""
    from tools import infer

    cfg, out, _ = tiny_run
    ckpt = torch.load(out / "last.pth", weights_only=True)
    train_ann = json.loads(open(json.loads(json.dumps(ckpt["config"]))["train_dataloader"]["dataset"]["ann_file"]).read())
    cats = sorted(train_ann["categories"], key=lambda c: c["id"])
    assert ckpt["classes"] == [{"label": i, "name": c["name"], "category_id": c["id"]} for i, c in enumerate(cats)]
    permuted, perm, val_ann = _permuted_val_json(cfg, tmp_path)
    proc = run_train(["-c", str(cfg), "-r", str(out / "last.pth"), "--test-only", "--output-dir", str(tmp_path / "t"),
                      "-u", f"val_dataloader.dataset.ann_file={permuted}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "t" / "eval" / "test.json").read_text())
    first = json.loads((out / "eval" / "0.json").read_text())
    assert again["categories"] == [{"label": i, "name": c["name"], "category_id": perm[c["id"]]}
                                   for i, c in enumerate(cats)]
    for key in ("AP", "AP50", "AP75"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)
    by_name = {row["name"]: (row["AP"], row["AP50"], row["num_gt"]) for row in first["per_class"]}
    assert {row["name"]: (row["AP"], row["AP50"], row["num_gt"]) for row in again["per_class"]} == by_name
    # infer: the same detections, category ids of the json it is given, names from the checkpoint
    images = json.loads(open(val_ann).read())["images"]
    img_dir = Path(val_ann).parent.parent / "images" / "val"
    runs = {}
    for tag, ann in (("orig", val_ann), ("perm", permuted)):
        args = infer.parse_args(["-c", str(cfg), "-r", str(out / "last.pth"), "--input", str(img_dir), "--out",
                                 str(tmp_path / tag), "--score", "0.0", "-u", f"val_dataloader.dataset.ann_file={ann}"])
        runs[tag] = infer.run(args)["detections"]
    assert runs["orig"] and len(runs["orig"]) == len(runs["perm"]) and images
    assert [perm[d["category_id"]] for d in runs["orig"]] == [d["category_id"] for d in runs["perm"]]


def test_onnx_export_stores_the_checkpoint_classes_in_its_metadata(tiny_run, tmp_path):
    import onnx

    from tools import export_onnx

    cfg, out, _ = tiny_run
    path = tmp_path / "model.onnx"
    assert export_onnx.main(["-c", str(cfg), "-r", str(out / "last.pth"), "--out", str(path)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == torch.load(out / "last.pth", weights_only=True)["classes"]
