"""Issue 9, findings 5 and 6: pinned host memory on CUDA, find_unused_parameters only when a parameter can
really miss its gradient, evaluation sums reduced in one collective, and requirements with lower bounds."""
from __future__ import annotations

import re
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from src.core import YAMLConfig
from src.misc import dist
from src.solver.loaders import build_loader
from src.solver.trainer import Trainer
from tests.helpers_tiny_run import one_thread_restored_torch_flags  # noqa: F401 (autouse fixture)
from tests.helpers_tiny_run import REPO, make_tiny_dataset, write_tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tp_data"), num_train=2, num_val=2)


def dset_trainer(tmp_path, data_root, dset_overrides: dict) -> Trainer:
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=True)
    return Trainer(YAMLConfig(str(cfg_path), overrides={"dset": dset_overrides, "max_iters_per_epoch": 1}),
                   device="cpu")


def test_pin_memory_defaults_to_true_on_cuda_false_on_cpu_and_the_config_wins(tmp_path, data_root):
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False)
    cfg = YAMLConfig(str(cfg_path))
    assert build_loader(cfg, "train_dataloader", True, 0, torch.device("cuda")).pin_memory is True
    assert build_loader(cfg, "train_dataloader", True, 0, torch.device("cpu")).pin_memory is False
    cfg = YAMLConfig(str(cfg_path), overrides={"train_dataloader": {"pin_memory": False}})
    assert build_loader(cfg, "train_dataloader", True, 0, torch.device("cuda")).pin_memory is False


def test_with_cass_every_parameter_gets_a_gradient_so_ddp_needs_no_find_unused_parameters(tmp_path, data_root):
    # pruning warms up for the whole run: no level is pruned, so the straight-through gate does nothing and
    # only CASS reaches the scorer
    trainer = dset_trainer(tmp_path, data_root, {"use_cass": True, "token_pruning_warmup_epochs": 5})
    assert [r for h in trainer.hooks for r in h.unused_parameter_reasons()] == []
    trainer.fit()
    missing = [n for n, p in trainer.state.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_without_cass_during_warmup_the_scorer_gets_no_gradient_and_find_unused_is_requested(tmp_path, data_root):
    trainer = dset_trainer(tmp_path, data_root, {"use_cass": False, "token_pruning_warmup_epochs": 5})
    reasons = [r for h in trainer.hooks for r in h.unused_parameter_reasons()]
    assert len(reasons) == 1 and "without CASS" in reasons[0]
    trainer.fit()
    missing = [n for n, p in trainer.state.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing and all("pruners" in n and "importance_predictor" in n for n in missing)


def test_evaluation_reduces_the_hooks_sums_in_one_all_reduce(tmp_path, data_root, monkeypatch):
    trainer = dset_trainer(tmp_path, data_root, {"use_cass": True})
    reduces = []

    def gather(out, obj, *a, **k):
        out[0] = obj

    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda *a: 1,
                           get_rank=lambda *a: 0, get_backend=lambda *a: "gloo", barrier=lambda *a, **k: None,
                           all_reduce=lambda t, *a, **k: reduces.append(t.numel()), all_gather_object=gather,
                           broadcast_object_list=lambda box, *a, **k: None)
    monkeypatch.setattr(dist, "tdist", fake)  # a 1-process group that counts the all-reduces
    stats = trainer.evaluate(0)
    assert len(reduces) == 1 and reduces[0] >= 20  # the keep-bias sums and counts, stacked (old: one per key)
    assert {"keep_recall_small", "centroid_dy"} <= set(stats["dset_bias"])


def _requirements():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(re.sub(r"#.*", "", line).strip()) for line in lines if re.sub(r"#.*", "", line).strip()]


def test_requirements_have_lower_bounds_the_installed_versions_satisfy():
    reqs = {r.name.lower(): r for r in _requirements()}
    assert Version("2.6") in reqs["torch"].specifier and Version("2.5.1") not in reqs["torch"].specifier
    assert hasattr(torch.nn.utils, "get_total_norm")  # the reason for torch >= 2.6
    for name, req in reqs.items():
        assert req.specifier, f"{name} has no lower bound"
        installed = metadata.version(name)
        assert req.specifier.contains(Version(installed), prereleases=True), f"{name} {installed} vs {req}"
