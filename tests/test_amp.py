"""Mixed precision on every device (autocast + GradScaler on CPU too, so CI runs the AMP code) and the
fixes found by the GPU review (issue 9): overflow steps are skipped, counted and never log an inf gradient
norm; resume works across AMP on/off; VFL logits are upcast; iter_time of the last iteration is right.

Tiny in-process runs on CPU (160x96, batch 2, 1-3 iterations), see tests/helpers_tiny_run.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from src.core import YAMLConfig
from src.core.yaml_utils import ConfigError
from src.solver.trainer import Trainer
from tests.helpers_tiny_run import one_thread_restored_torch_flags  # noqa: F401 (autouse fixture)
from tests.helpers_tiny_run import make_tiny_dataset, read_scalars, write_tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("amp_data"), num_train=8, num_val=2)


FP16_HW = (64, 64)  # float16 autocast on CPU is about 50x slower than float32: its tests run at 64x64


def tiny_trainer(tmp_path, data_root, overrides=None, hw=None, **kwargs) -> Trainer:
    """The tiny plain RT-DETRv2 trainer (it evaluates on 2 images after the last epoch); ``hw``: input size."""
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False,
                                 **({"hw": hw} if hw else {}))
    return Trainer(YAMLConfig(str(cfg_path), overrides=overrides or {}), device="cpu", **kwargs)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


# --------------------------------------------------------------------------- finding 1: overflow steps
def test_float16_amp_overflow_steps_are_skipped_counted_and_never_log_an_inf_grad_norm(tmp_path, data_root):
    trainer = tiny_trainer(tmp_path, data_root, {"use_amp": True, "amp_dtype": "float16", "amp_init_scale": 1e30,
                                                "max_iters_per_epoch": 2}, hw=FP16_HW)
    assert trainer.state.scaler.is_enabled() and trainer.amp_dtype == torch.float16
    before = weights(trainer)
    trainer.fit()
    # 1e30 * any float16 gradient overflows: every step is skipped by the scaler, which halves its scale
    assert trainer.state.amp_overflow_steps == 2 and trainer.state.nonfinite_skipped == 0
    assert trainer.state.scaler.get_scale() == pytest.approx(1e30 / 2 ** 2, rel=1e-6)
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(("weight", "bias")))
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert trainer.state.ema.updates == 0  # nothing was applied, so nothing was averaged
    tb = read_scalars(tmp_path / "out" / "tb")
    assert "train/grad_norm" not in tb  # the norms were inf: none reached the logger
    assert [v for _, v in tb["train/amp_overflow_steps"]] == [1.0, 2.0]  # print_freq 1
    assert all(math.isfinite(v) for _, v in tb["loss/total"])
    record = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == {"amp_overflow": 2, "nonfinite": 0}
    ckpt = torch.load(tmp_path / "out" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["amp_overflow_steps"] == 2 and ckpt["scaler"]["scale"] == pytest.approx(2.5e29, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_steps_on_cpu_update_the_weights_with_finite_losses(tmp_path, data_root, dtype):
    # scale 1: the tiny model's float16 gradients fit without scaling (65536 overflows its first step)
    trainer = tiny_trainer(tmp_path, data_root, {"use_amp": True, "amp_dtype": dtype, "amp_init_scale": 1.0,
                                                 "max_iters_per_epoch": 1}, hw=FP16_HW)
    assert trainer.state.scaler.is_enabled() == (dtype == "float16")  # bfloat16 has float32's range: no scaler
    seen = []
    trainer.state.model.register_forward_hook(lambda m, a, out: seen.append(out["pred_logits"].dtype))
    before = weights(trainer)
    trainer.fit()
    assert seen == [getattr(torch, dtype)]  # the forward ran under autocast in that dtype
    after = weights(trainer)
    assert trainer.state.amp_overflow_steps == 0 and trainer.state.ema.updates == 1
    assert not torch.equal(before["decoder.dec_score_head.0.weight"], after["decoder.dec_score_head.0.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    tb = read_scalars(tmp_path / "out" / "tb")
    assert all(math.isfinite(v) for _, v in tb["train/grad_norm"] + tb["loss/total"])


@pytest.mark.parametrize("key, value, expected", [("amp_dtype", "float32", "one of float16, bfloat16"),
                                                  ("amp_init_scale", 0, "finite number > 0")])
def test_amp_settings_are_validated_at_load_time(tmp_path, data_root, key, value, expected):
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False)
    with pytest.raises(ConfigError, match=f"{key} = .*{expected}"):
        YAMLConfig(str(cfg_path), overrides={key: value})


# --------------------------------------------------------------------------- finding 2: resume across AMP
def test_resume_a_checkpoint_without_amp_with_amp_and_back(tmp_path, data_root, capsys):
    base = {"max_iters_per_epoch": 1, "amp_dtype": "float16"}   # the scaler is float16's (on CPU it is not the default)
    tiny_trainer(tmp_path, data_root, {**base, "epochs": 1}, hw=FP16_HW).fit()
    last = str(tmp_path / "out" / "last.pth")
    assert torch.load(last, weights_only=True)["scaler"] == {}  # written without AMP: empty scaler state

    amp = tiny_trainer(tmp_path, data_root, {**base, "epochs": 2, "amp_init_scale": 1024.0}, hw=FP16_HW, use_amp=True,
                       resume=last)
    assert "written without float16 AMP (no GradScaler state): a fresh scaler starts at amp_init_scale = 1024" \
        in capsys.readouterr().out
    assert amp.state.scaler.get_scale() == 1024.0 and amp.state.epoch == 1
    amp.fit()
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["scaler"]["scale"] > 0

    plain = tiny_trainer(tmp_path, data_root, {**base, "epochs": 3}, hw=FP16_HW, resume=last)
    assert "written with float16 AMP (loss scale" in capsys.readouterr().out
    assert not plain.state.scaler.is_enabled() and plain.state.epoch == 2
    plain.fit()
    assert torch.load(last, weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- finding 4: VFL under autocast
def test_varifocal_loss_upcasts_float16_logits():
    from src.zoo.rtdetr.rtdetrv2_criterion import match_from_indices, varifocal_loss

    logits = torch.full((1, 4, 3), -12.0)  # confident negatives: sigmoid^2 = 3.8e-11, below float16's range
    logits[0, 1, 2] = 2.0
    match = match_from_indices([(torch.tensor([1]), torch.tensor([0]))], [1], "cpu")
    labels, scores = torch.tensor([2]), torch.tensor([0.8])
    reference = varifocal_loss(logits, match, labels, scores, 0.75, 2.0)
    half = varifocal_loss(logits.half(), match, labels, scores, 0.75, 2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(reference.item(), rel=1e-6)
    negatives = 0.75 * torch.sigmoid(torch.tensor(-12.0)) ** 2 * torch.nn.functional.softplus(torch.tensor(-12.0))
    assert reference.item() > 10 * negatives.item()  # the negatives' weight is part of the reference


# --------------------------------------------------------------------------- finding 7: iter_time
def test_iter_time_of_the_last_iteration_is_averaged_over_the_iterations_since_the_last_log(tmp_path, data_root,
                                                                                          monkeypatch):
    import src.solver.trainer as trainer_module

    clock = {"t": 0.0}
    real_step = trainer_module.train_step

    def step_taking_one_second(*args, **kwargs):
        clock["t"] += 1.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step_taking_one_second)
    monkeypatch.setattr(trainer_module.time, "time", lambda: clock["t"])
    # 4 iterations, print_freq 2: logged at iterations 0, 2 and the last one, 3, ONE iteration after 2
    # (the old code divided that interval by min(print_freq, i) = 2 and reported 0.5 s)
    trainer = tiny_trainer(tmp_path, data_root, {"print_freq": 2, "epochs": 1})
    assert trainer.iters_per_epoch == 4
    trainer.fit()
    assert [v for _, v in read_scalars(tmp_path / "out" / "tb")["train/iter_time"]] == [1.0, 1.0, 1.0]


def test_amp_dtype_defaults_to_bfloat16_on_cpu_and_warns_on_explicit_float16(capsys):
    from src.solver.train_step import amp_dtype_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for({}, cpu, True) == torch.bfloat16
    assert amp_dtype_for({}, cuda, True) == torch.float16
    assert amp_dtype_for({"amp_dtype": "bfloat16"}, cuda, True) == torch.bfloat16
    capsys.readouterr()
    assert amp_dtype_for({"amp_dtype": "float16"}, cpu, True) == torch.float16
    warning = capsys.readouterr().out
    assert "about 50x slower" in warning and "amp_dtype: bfloat16" in warning
    amp_dtype_for({"amp_dtype": "float16"}, cpu, False)
    assert capsys.readouterr().out == ""


def test_float16_amp_two_epochs_equal_one_epoch_then_resume_in_weights_optimizer_and_scaler(tmp_path, data_root):
    """Exact resume under float16 AMP (the GradScaler state included), at 64x64 so float16 on CPU stays quick."""
    def trainer(out, epochs, **kw):
        cfg_path = write_tiny_config(tmp_path / f"{out}.yaml", data_root, tmp_path / out, dset=False, hw=FP16_HW,
                                     augment=False)
        overrides = {"max_iters_per_epoch": 1, "epochs": epochs, "amp_dtype": "float16", "amp_init_scale": 256.0,
                     "use_ema": True, "deterministic": True}
        return Trainer(YAMLConfig(str(cfg_path), overrides=overrides), device="cpu", use_amp=True, **kw)

    straight = trainer("straight", 2)
    straight.fit()
    first = trainer("split", 1)
    first.fit()
    resumed = trainer("split", 2, resume=str(tmp_path / "split" / "last.pth"))
    assert resumed.state.epoch == 1 and resumed.state.scaler.get_scale() == first.state.scaler.get_scale()
    resumed.fit()
    a, b = straight.state, resumed.state
    assert a.step == b.step == 2
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(a.ema.module.state_dict().values(), b.ema.module.state_dict().values()):
        assert torch.equal(va, vb)
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert a.scaler.state_dict() == b.scaler.state_dict() and a.scaler.get_scale() > 0


@pytest.mark.parametrize("eval_amp, dtype", [(None, "bfloat16"), (False, "float32")])
def test_evaluation_runs_under_the_training_autocast_and_postprocesses_float32(tmp_path, data_root, eval_amp,
                                                                                dtype):
    overrides = {"use_amp": True, "amp_dtype": "bfloat16", "eval_amp": eval_amp}
    trainer = tiny_trainer(tmp_path, data_root, overrides, hw=FP16_HW)
    model = trainer.state.ema.module
    seen = {}
    linears = [m.register_forward_hook(lambda m, a, out: seen.setdefault("linear", set()).add(out.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h2 = trainer.postprocessor.register_forward_pre_hook(  # the first batch's (a hook returning None)
        lambda m, args: seen.update(logits=seen.get("logits", args[0]["pred_logits"].detach().clone())))
    stats = trainer.evaluate_only()
    [h.remove() for h in linears + [h2]]
    assert stats["eval_dtype"] == dtype and seen["linear"] == {getattr(torch, dtype)}  # every linear layer
    # the postprocessor got float32: the model's own outputs on the first val batch, cast up
    images, _ = next(iter(trainer.val_loader))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        reference = model(images)["pred_logits"]
    assert seen["logits"].dtype == torch.float32 and torch.equal(seen["logits"], reference.float())
    assert json.loads((tmp_path / "out" / "eval" / "test.json").read_text())["eval_dtype"] == dtype


def test_eval_amp_key_is_validated(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"eval_amp.*'on'.*true, false or null"):
        tiny_trainer(tmp_path, data_root, {"eval_amp": "on"})


@pytest.mark.parametrize("eval_amp, use_amp, dtype, device, expected", [
    (None, True, torch.bfloat16, "cpu", True), (None, True, torch.float16, "cuda", True),
    (None, True, torch.float16, "cpu", False),   # float16 autocast on CPU: evaluation stays float32
    (None, False, torch.bfloat16, "cpu", False), (True, False, torch.bfloat16, "cpu", True),
    (False, True, torch.float16, "cuda", False)])
def test_eval_amp_follows_use_amp_except_float16_on_cpu(eval_amp, use_amp, dtype, device, expected):
    from src.solver.train_step import eval_amp_for
    assert eval_amp_for(eval_amp, use_amp, dtype, torch.device(device)) is expected


def test_explicit_eval_amp_with_float16_on_cpu_warns(capsys):
    from src.solver.train_step import eval_amp_for
    assert eval_amp_for(True, True, torch.float16, torch.device("cpu")) is True
    assert "50x slower" in capsys.readouterr().out
