"""Checkpoint IO (atomic save, safe load), weight extraction / shape-matched tuning, RNG state."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from src.misc.checkpoint import (extract_state_dict, load_checkpoint, load_matching_weights,
                                 save_checkpoint)
from src.misc.rng import get_rng_state, seed_everything, set_rng_state


class NotATensor:
    """A custom class: the safe loader must refuse it."""

    def __init__(self, x):
        self.x = x


def test_checkpoint_round_trip_preserves_tensors_and_plain_values(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "last_epoch": 7, "name": "run",
           "lrs": [1e-4, 1e-5], "nested": {"t": torch.tensor([1, 2], dtype=torch.int64)}}
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(obj, path)
    back = load_checkpoint(path)
    torch.testing.assert_close(back["model"]["w"], obj["model"]["w"])
    torch.testing.assert_close(back["nested"]["t"], obj["nested"]["t"])
    assert (back["last_epoch"], back["name"], back["lrs"]) == (7, "run", [1e-4, 1e-5])
    assert os.listdir(path.parent) == ["ckpt.pth"]


def test_crash_while_saving_leaves_previous_checkpoint_readable_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise RuntimeError("simulated crash (disk full) while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = load_checkpoint(path)
    assert back["epoch"] == 1
    torch.testing.assert_close(back["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pth"]


def test_safe_load_refuses_pickled_custom_object_and_trusted_loads_it(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"cfg": NotATensor(3), "w": torch.ones(1)}, path)
    with pytest.raises(pickle.UnpicklingError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "trusted=True" in msg
    back = load_checkpoint(path, trusted=True)
    assert isinstance(back["cfg"], NotATensor) and back["cfg"].x == 3


def test_missing_checkpoint_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_extract_state_dict_prefers_ema_then_model_and_strips_module_prefix():
    ema_sd = {"module.a": torch.zeros(1)}
    model_sd = {"module.a": torch.ones(1)}
    sd = extract_state_dict({"ema": {"module": ema_sd, "updates": 5}, "model": model_sd})
    assert list(sd) == ["a"] and sd["a"].item() == 0.0
    sd = extract_state_dict({"model": model_sd, "optimizer": {}})
    assert list(sd) == ["a"] and sd["a"].item() == 1.0
    sd = extract_state_dict({"a": torch.ones(2), "b.c": torch.zeros(1)})
    assert sorted(sd) == ["a", "b.c"]
    with pytest.raises(KeyError, match="optimizer"):
        extract_state_dict({"optimizer": {}, "epoch": 3})


class Detector(nn.Module):
    """Toy model with RT-DETR's class-dependent layer names."""

    def __init__(self, num_classes, hidden=8, extra=False):
        super().__init__()
        self.backbone = nn.Linear(4, hidden)
        self.decoder = nn.Module()
        self.decoder.enc_score_head = nn.Linear(hidden, num_classes)
        self.decoder.dec_score_head = nn.ModuleList([nn.Linear(hidden, num_classes) for _ in range(2)])
        self.decoder.denoising_class_embed = nn.Embedding(num_classes + 1, hidden)
        self.decoder.bbox_head = nn.Linear(hidden, 4)
        if extra:
            self.pruner = nn.Linear(hidden, 1)


CLASS_KEYS = ["decoder.enc_score_head.weight", "decoder.enc_score_head.bias",
              "decoder.dec_score_head.0.weight", "decoder.dec_score_head.0.bias",
              "decoder.dec_score_head.1.weight", "decoder.dec_score_head.1.bias",
              "decoder.denoising_class_embed.weight"]


def test_tuning_80_to_8_classes_reinitialises_exactly_the_class_layers(tmp_path, capsys):
    torch.manual_seed(0)
    official = Detector(80)
    sd = official.state_dict()
    sd["old_aux_head.weight"] = torch.zeros(3)  # in the checkpoint only
    save_checkpoint({"ema": {"module": {f"module.{k}": v for k, v in sd.items()}}}, tmp_path / "o.pth")
    model = Detector(8, extra=True)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_matching_weights(model, extract_state_dict(load_checkpoint(tmp_path / "o.pth")),
                                   verbose=True)

    assert [k for k, _, _ in report.mismatched] == CLASS_KEYS
    shapes = {k: (a, b) for k, a, b in report.mismatched}
    assert shapes["decoder.enc_score_head.weight"] == ((80, 8), (8, 8))
    assert shapes["decoder.denoising_class_embed.weight"] == ((81, 8), (9, 8))
    assert report.missing == ["pruner.weight", "pruner.bias"]
    assert report.unexpected == ["old_aux_head.weight"]
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight", "decoder.bbox_head.bias",
                                     "decoder.bbox_head.weight"]
    after = model.state_dict()
    for k in report.loaded:
        torch.testing.assert_close(after[k], sd[k])
    for k in CLASS_KEYS + report.missing:
        torch.testing.assert_close(after[k], init[k])  # left at initialisation
    text = str(report)
    assert "RE-INITIALISED" in text and "num_classes" in text
    assert "decoder.enc_score_head.weight: checkpoint [80, 8] vs model [8, 8]" in text
    assert "loaded 4/13 model tensors" in capsys.readouterr().out


def test_strict_mode_raises_with_the_list_and_leaves_model_untouched():
    model = Detector(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        load_matching_weights(model, Detector(80).state_dict(), strict=True, verbose=False)
    assert all(k in str(e.value) for k in CLASS_KEYS)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    exact = load_matching_weights(model, Detector(8).state_dict(), strict=True, verbose=False)
    assert exact.is_exact and exact.num_loaded == 11


def test_adapters_run_before_matching_and_their_messages_are_reported():
    src = Detector(8).state_dict()
    src = {k.replace("bbox_head", "box_head_v0"): v for k, v in src.items()}

    def rename(sd, model_sd):
        out = {k.replace("box_head_v0", "bbox_head"): v for k, v in sd.items()}
        return out, [f"renamed box_head_v0 -> bbox_head ({sum('box_head_v0' in k for k in sd)} tensors)"]

    model = Detector(8)
    report = load_matching_weights(model, src, adapters=[rename], verbose=False)
    assert report.is_exact and report.num_loaded == 11
    assert report.messages == ["renamed box_head_v0 -> bbox_head (2 tensors)"]
    torch.testing.assert_close(model.decoder.bbox_head.weight, src["decoder.box_head_v0.weight"])


# ---------------------------------------------------------------- RNG state

def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.randn(), torch.rand(3).tolist())


def test_rng_state_round_trip_through_weights_only_checkpoint_reproduces_draws(tmp_path):
    seed_everything(123)
    random.gauss(0, 1)  # leaves a cached gaussian (gauss_next is a float)
    np.random.randn()   # numpy caches one too when drawing an odd count
    save_checkpoint({"rng": get_rng_state()}, tmp_path / "rng.pth")
    expected = _draw()
    seed_everything(999)
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only=True load
    assert _draw() == expected


def test_seed_everything_same_seed_same_draws_and_deterministic_flags():
    seed_everything(7)
    a = _draw()
    seed_everything(7)
    assert _draw() == a
    seed_everything(7, deterministic=True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        seed_everything(7, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_new_best_is_serialised_once_and_copied_to_last(tmp_path, monkeypatch):
    """End of an epoch with a new best AP: last.pth (before the evaluation, for crash safety) and best.pth, which
    is also the new last.pth (its best_ap updated) by a file copy: two serialisations, not three."""
    import src.misc.checkpoint as mc
    from src.core import YAMLConfig
    from src.solver.trainer import Trainer
    from tests.helpers_tiny_run import make_tiny_dataset, write_tiny_config

    data = make_tiny_dataset(tmp_path / "data", num_train=2, num_val=2)
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, tmp_path / "out", dset=False, hw=(64, 64))
    trainer = Trainer(YAMLConfig(str(cfg), overrides={"epochs": 1, "max_iters_per_epoch": 1}), device="cpu")
    saved, real = [], mc.torch.save
    monkeypatch.setattr(mc.torch, "save", lambda obj, f, *a, **k: (saved.append(obj["best_ap"]), real(obj, f, *a, **k)))
    trainer.fit()
    best = (tmp_path / "out" / "best.pth").read_bytes()
    assert len(saved) == 2 and saved[0] == -1.0 and saved[1] == trainer.state.best_ap >= 0
    assert (tmp_path / "out" / "last.pth").read_bytes() == best
    assert torch.load(tmp_path / "out" / "last.pth", weights_only=True)["best_ap"] == trainer.state.best_ap
    assert trainer.state.last_saved_epoch == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".pth") == ["best.pth", "last.pth"]
