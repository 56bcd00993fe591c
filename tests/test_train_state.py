"""TrainState: the run's modules and counters in one object, whose state_dict / load_state_dict a resume uses."""
from __future__ import annotations

import io

import torch
from torch import nn

from src.optim.ema import ModelEMA
from src.solver.state import TrainState


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainState(model=model, optimizer=opt, lr_scheduler=sched, scaler=scaler, ema=ModelEMA(model, warmups=0))


def _train(state: TrainState, steps: int):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g)
        loss = state.model(x).square().mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.ema.update(state.model)
        state.lr_scheduler.step()
        state.step += 1


def test_a_state_loaded_from_another_continues_bit_identically():
    a = _state(0)
    _train(a, 3)
    a.best_ap, a.nonfinite_skipped, a.amp_overflow_steps = 0.25, 1, 2
    b = _state(1)  # other initial weights
    buf = io.BytesIO()  # through a file, as a checkpoint goes (a live state_dict shares the optimizer's tensors)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.step, b.best_ap, b.nonfinite_skipped, b.amp_overflow_steps) == (3, 0.25, 1, 2)
    assert b.lr_scheduler.get_last_lr() == a.lr_scheduler.get_last_lr() == [5e-3]
    _train(a, 2)
    _train(b, 2)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(a.ema.module.state_dict().values(), b.ema.module.state_dict().values()):
        assert torch.equal(pa, pb)
    assert a.optimizer.state_dict()["state"][0]["exp_avg"].equal(b.optimizer.state_dict()["state"][0]["exp_avg"])


def test_the_state_dict_holds_the_unwrapped_model_and_plain_values_only():
    s = _state(0).state_dict()
    assert set(s) == {"model", "ema", "optimizer", "lr_scheduler", "scaler", "step", "best_ap", "nonfinite_skipped",
                      "amp_overflow_steps"}
    assert set(s["model"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                               "1.num_batches_tracked", "2.weight", "2.bias"}
