"""Optimizer groups, warmup/decay learning-rate schedule, and model EMA."""
import math

import pytest
import torch
import torch.nn as nn

from src.misc.checkpoint import load_checkpoint, save_checkpoint
from src.optim.ema import ModelEMA
from src.optim.lr_scheduler import WarmupScheduler, build_lr_scheduler
from src.optim.optimizer import (RTDETR_PARAM_GROUPS, build_optimizer, check_param_groups,
                                 params_with_unwanted_weight_decay)


class ConvNorm(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, bias=False)
        self.norm = nn.BatchNorm2d(c_out)


class ToyRTDETR(nn.Module):
    """Parameter names shaped like RT-DETR's (backbone / encoder / decoder)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.conv1 = ConvNorm(3, 4)
        self.backbone.stem_frozen = nn.Conv2d(3, 3, 1)
        self.backbone.stem_frozen.requires_grad_(False)
        self.encoder = nn.Module()
        self.encoder.linear1 = nn.Linear(4, 4)
        self.encoder.norm1 = nn.LayerNorm(4)
        self.decoder = nn.Module()
        self.decoder.dec_score_head = nn.ModuleList([nn.Linear(4, 3)])
        self.decoder.denoising_class_embed = nn.Embedding(4, 4)


BASE_CFG = {"type": "AdamW", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 1e-4}


def _group_names(opt, model):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(name_of[id(p)] for p in g["params"]) for g in opt.param_groups}


def test_rtdetr_groups_assign_expected_params_lr_and_weight_decay():
    model = ToyRTDETR()
    opt = build_optimizer(model, {**BASE_CFG, "params": RTDETR_PARAM_GROUPS})
    groups = _group_names(opt, model)
    assert groups == {
        "backbone": ["backbone.conv1.conv.weight"],
        "backbone_norm_bias": ["backbone.conv1.norm.bias", "backbone.conv1.norm.weight"],
        "enc_dec_norm_bias": ["decoder.dec_score_head.0.bias", "encoder.linear1.bias",
                              "encoder.norm1.bias", "encoder.norm1.weight"],
        "default": ["decoder.dec_score_head.0.weight", "decoder.denoising_class_embed.weight",
                    "encoder.linear1.weight"],
    }
    settings = {g["name"]: (g["lr"], g["weight_decay"], tuple(g["betas"])) for g in opt.param_groups}
    assert settings == {"backbone": (1e-5, 1e-4, (0.9, 0.999)),
                        "backbone_norm_bias": (1e-5, 0.0, (0.9, 0.999)),
                        "enc_dec_norm_bias": (1e-4, 0.0, (0.9, 0.999)),
                        "default": (1e-4, 1e-4, (0.9, 0.999))}
    check_param_groups(model, opt)
    assert params_with_unwanted_weight_decay(model, opt) == []


def test_frozen_params_are_excluded_and_no_groups_gives_one_default_group():
    model = ToyRTDETR()
    opt = build_optimizer(model, {"type": "SGD", "lr": 0.1, "momentum": 0.9})
    assert [g["name"] for g in opt.param_groups] == ["default"]
    ids = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.backbone.stem_frozen.weight) not in ids
    assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad) == 10
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_param_matched_by_two_groups_is_an_error_naming_param_and_both_regexes():
    cfg = {**BASE_CFG, "params": [{"params": "encoder", "lr": 1e-5}, {"params": r"norm1\.bias"}]}
    with pytest.raises(ValueError) as e:
        build_optimizer(ToyRTDETR(), cfg)
    msg = str(e.value)
    assert "encoder.norm1.bias" in msg and "'encoder'" in msg and r"'norm1\\.bias'" in msg


def test_group_matching_nothing_is_an_error_naming_the_regex():
    with pytest.raises(ValueError, match="backbon3"):
        build_optimizer(ToyRTDETR(), {**BASE_CFG, "params": [{"params": "backbon3", "lr": 1e-5}]})


def test_frozen_only_match_counts_as_matching_nothing():
    with pytest.raises(ValueError, match="stem_frozen"):
        build_optimizer(ToyRTDETR(), {**BASE_CFG, "params": [{"params": "stem_frozen"}]})


def test_unknown_optimizer_keys_and_types_are_errors_listing_valid_ones():
    with pytest.raises(KeyError) as e:
        build_optimizer(ToyRTDETR(), {**BASE_CFG, "weight_decy": 0.1})
    assert "weight_decy" in str(e.value) and "weight_decay" in str(e.value)
    with pytest.raises(KeyError) as e:
        build_optimizer(ToyRTDETR(), {**BASE_CFG, "params": [{"params": "encoder", "lrr": 1.0}]})
    assert "params[0]" in str(e.value) and "lrr" in str(e.value)
    with pytest.raises(KeyError, match="AdamW"):
        build_optimizer(ToyRTDETR(), {"type": "Adam", "lr": 1e-3})


def test_check_param_groups_catches_duplicates_missing_and_frozen():
    model = ToyRTDETR()
    opt = build_optimizer(model, {**BASE_CFG, "params": RTDETR_PARAM_GROUPS})
    opt.param_groups[0]["params"].append(model.encoder.linear1.weight)  # now in two groups
    with pytest.raises(AssertionError, match="encoder.linear1.weight"):
        check_param_groups(model, opt)
    opt.param_groups[0]["params"].pop()
    default = opt.param_groups[-1]["params"]
    default[:] = [p for p in default if p is not model.decoder.denoising_class_embed.weight]
    with pytest.raises(AssertionError, match="no group.*denoising_class_embed"):
        check_param_groups(model, opt)
    opt.param_groups[-1]["params"].append(model.decoder.denoising_class_embed.weight)
    opt.param_groups[-1]["params"].append(model.backbone.stem_frozen.weight)
    with pytest.raises(AssertionError, match="frozen.*stem_frozen"):
        check_param_groups(model, opt)


def test_unwanted_weight_decay_detector_flags_norms_and_biases_in_decayed_group():
    model = ToyRTDETR()
    opt = build_optimizer(model, BASE_CFG)  # everything decays
    assert sorted(params_with_unwanted_weight_decay(model, opt)) == [
        "backbone.conv1.norm.bias", "backbone.conv1.norm.weight", "decoder.dec_score_head.0.bias",
        "encoder.linear1.bias", "encoder.norm1.bias", "encoder.norm1.weight"]


# ---------------------------------------------------------------- learning-rate schedule

def _opt_two_groups():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-5}], lr=1e-4)


def _run(sched, n):
    """LRs used at iterations 0..n-1 when stepping once per iteration."""
    lrs = []
    for _ in range(n):
        lrs.append(sched.get_last_lr())
        sched.optimizer.step()
        sched.step()
    return lrs


def test_multistep_with_warmup_matches_hand_computed_lrs():
    opt = _opt_two_groups()
    sched = build_lr_scheduler(opt, {"type": "MultiStepLR", "milestones": [4, 8], "gamma": 0.1},
                               {"type": "LinearWarmup", "warmup_duration": 10},
                               iters_per_epoch=5, epochs=10)
    lrs = _run(sched, 50)
    expect = {0: 1e-4 * 1 / 10, 4: 1e-4 * 5 / 10, 5: 1e-4 * 6 / 10, 9: 1e-4, 10: 1e-4, 19: 1e-4,
              20: 1e-5, 39: 1e-5, 40: 1e-6, 49: 1e-6}
    for it, lr in expect.items():
        assert lrs[it][0] == pytest.approx(lr, rel=1e-12), it
        assert lrs[it][1] == pytest.approx(lr / 10, rel=1e-12), it


def test_multistep_equals_official_epoch_stepped_multisteplr_plus_linear_warmup():
    """Reference: torch MultiStepLR stepped per epoch, warmup overriding lr per iteration (RT-DETR)."""
    ipe, epochs, warm = 7, 6, 10
    opt = _opt_two_groups()
    ours = _run(build_lr_scheduler(opt, {"type": "MultiStepLR", "milestones": [2, 4], "gamma": 0.5},
                                   {"type": "LinearWarmup", "warmup_duration": warm}, ipe, epochs),
                ipe * epochs)
    ref_opt = _opt_two_groups()
    ref = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[2, 4], gamma=0.5)
    base = [1e-4, 1e-5]
    it = 0
    for _ in range(epochs):
        for _ in range(ipe):
            lr = [g["lr"] for g in ref_opt.param_groups]
            if it < warm:
                lr = [b * min(1.0, (it + 1) / warm) for b in base]
            assert ours[it] == pytest.approx(lr, rel=1e-12), it
            ref_opt.step()
            it += 1
        ref.step()


def test_cosine_without_warmup_equals_torch_cosine_annealing():
    opt = _opt_two_groups()
    sched = build_lr_scheduler(opt, {"type": "CosineLR", "min_lr_ratio": 0.1}, None,
                               iters_per_epoch=4, epochs=5)
    ours = _run(sched, 25)
    ref_opt = _opt_two_groups()
    ref_a = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=20, eta_min=1e-5)
    for it in range(21):
        # torch's eta_min is shared by groups; compare the first group only
        assert ours[it][0] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9), it
        ref_opt.step()
        ref_a.step()
    assert ours[24] == pytest.approx([1e-5, 1e-6])  # stays at min after total_iters
    assert ours[10][1] == pytest.approx(1e-5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))


def test_constant_when_no_scheduler_and_no_warmup():
    opt = _opt_two_groups()
    lrs = _run(build_lr_scheduler(opt, None, None, iters_per_epoch=3, epochs=2), 6)
    assert lrs == [[1e-4, 1e-5]] * 6


def test_scheduler_state_dict_round_trip_through_checkpoint_resumes_same_lrs(tmp_path):
    cfg = ({"type": "MultiStepLR", "milestones": [2], "gamma": 0.1},
           {"type": "LinearWarmup", "warmup_duration": 6})
    opt = _opt_two_groups()
    sched = build_lr_scheduler(opt, *cfg, iters_per_epoch=4, epochs=4)
    _run(sched, 5)
    save_checkpoint({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, tmp_path / "c.pth")
    expected = _run(sched, 11)

    ckpt = load_checkpoint(tmp_path / "c.pth")
    opt2 = _opt_two_groups()
    sched2 = build_lr_scheduler(opt2, *cfg, iters_per_epoch=4, epochs=4)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["lr_scheduler"])
    assert sched2.last_iter == 5
    assert _run(sched2, 11) == expected


def test_scheduler_config_errors_name_the_bad_key():
    opt = _opt_two_groups()
    with pytest.raises(KeyError) as e:
        build_lr_scheduler(opt, {"type": "MultiStepLR", "milestone": [3]}, None, 10, 5)
    assert "milestone" in str(e.value) and "milestones" in str(e.value)
    with pytest.raises(KeyError, match="warmup_iters"):
        build_lr_scheduler(opt, None, {"type": "LinearWarmup", "warmup_iters": 3}, 10, 5)
    with pytest.raises(KeyError, match="CosineLR"):
        build_lr_scheduler(opt, {"type": "StepLR"}, None, 10, 5)
    with pytest.raises(ValueError, match="increasing"):
        WarmupScheduler(opt, 0, "multistep", 10, milestones=[5, 2])


# ---------------------------------------------------------------- EMA

def _linear(w, b):
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.copy_(torch.tensor([b]))
    return m


def test_ema_after_updates_equals_hand_computed_weights():
    model = _linear([1.0, 2.0], 0.5)
    ema = ModelEMA(model, decay=0.9, warmups=10)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
        model.bias.fill_(1.5)
    ema.update(model)
    d1 = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.current_decay() == pytest.approx(d1)
    expect_w = [d1 * 1.0 + (1 - d1) * 3.0, d1 * 2.0 + (1 - d1) * -2.0]
    expect_b = d1 * 0.5 + (1 - d1) * 1.5
    assert ema.module.weight.detach().tolist()[0] == pytest.approx(expect_w, rel=1e-6)
    assert ema.module.bias.item() == pytest.approx(expect_b, rel=1e-6)
    ema.update(model)  # second update, model unchanged
    d2 = 0.9 * (1 - math.exp(-2 / 10))
    assert ema.module.bias.item() == pytest.approx(d2 * expect_b + (1 - d2) * 1.5, rel=1e-6)
    assert ema.updates == 2


def test_ema_module_is_frozen_eval_copy_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5, warmups=0)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    model.train()
    model(torch.randn(4, 2))  # updates running stats and num_batches_tracked
    ema.update(model)
    assert ema.module[1].num_batches_tracked.item() == 1
    # warmups=0 -> constant decay 0.5
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * torch.zeros(2) + 0.5 * model[1].running_mean)


def test_ema_unwraps_dataparallel_wrapped_model():
    model = _linear([1.0, 1.0], 0.0)
    ema = ModelEMA(nn.DataParallel(model), decay=0.5, warmups=0)
    assert set(ema.module.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        model.bias.fill_(2.0)
    ema.update(nn.DataParallel(model))
    assert ema.module.bias.item() == pytest.approx(1.0)


def test_ema_state_dict_round_trip_keeps_update_count(tmp_path):
    model = _linear([1.0, 2.0], 0.0)
    ema = ModelEMA(model, decay=0.99, warmups=5)
    for _ in range(3):
        with torch.no_grad():
            model.bias.add_(1.0)
        ema.update(model)
    save_checkpoint({"ema": ema.state_dict()}, tmp_path / "ema.pth")
    ema2 = ModelEMA(_linear([0.0, 0.0], 0.0), decay=0.99, warmups=5)
    ema2.load_state_dict(load_checkpoint(tmp_path / "ema.pth")["ema"])
    assert ema2.updates == 3
    assert ema2.module.bias.item() == pytest.approx(ema.module.bias.item())
    assert ema2.current_decay() == pytest.approx(0.99 * (1 - math.exp(-3 / 5)))


def test_ema_update_blends_every_float_entry_with_a_handful_of_multi_tensor_ops():
    """The update reads the tensors themselves (state_dict(keep_vars=True)): two foreach ops for all float entries
    and one copy per non-float buffer, no detached view or cast per entry (each is a dispatcher call, and on a
    GPU a training step is launch-bound); the arithmetic is the EMA formula."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    ema = ModelEMA(model, decay=0.9, warmups=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ema.update(model)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and
           (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert sorted(set(ops)) == ["aten::_foreach_add_", "aten::_foreach_mul_", "aten::copy_"], ops
    assert ops.count("aten::copy_") == 2  # the two num_batches_tracked
    live = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * live[k])
        else:
            assert torch.equal(v, live[k])
