"""Persistent loader workers (issue 18 item 5): they follow the epoch (policies, multi-scale stop, seeds)
exactly as fresh workers do, and a bad value of the key is refused."""
from __future__ import annotations

import pytest
import torch

from src.core import YAMLConfig
from src.core.yaml_utils import ConfigError
from src.data.collate import BatchImageCollateFunction
from src.solver.loaders import build_loader, start_epoch
from tests.helpers_tiny_run import make_tiny_dataset, write_tiny_config

SCALES = [[64, 96], [96, 160], [128, 224]]
EPOCHS = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("workers_data"), num_train=4, num_val=2)


def train_loader(tmp_path, data_root, persistent):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = write_tiny_config(tmp_path / "tiny.yaml", data_root, tmp_path / "out", dset=False)
    train = {"num_workers": 2, "persistent_workers": persistent, "shuffle": False,  # same order every epoch
             "collate_fn": {"type": "BatchImageCollateFunction", "scales": SCALES, "stop_epoch": 1},
             "dataset": {"transforms": {"policy": {"name": "stop_epoch", "epoch": 3,
                                                   "ops": ["RandomPhotometricDistort", "RandomHorizontalFlip"]}}}}
    cfg = YAMLConfig(str(cfg_path), overrides={"train_dataloader": train})
    return build_loader(cfg, "train_dataloader", True, 7, torch.device("cpu"))


def epochs_of(loader):
    out, iterators = [], []
    for epoch in range(EPOCHS):
        start_epoch(loader, 7, epoch)
        out.append([(images.clone(), [t["boxes"].clone() for t in targets]) for images, targets in loader])
        iterators.append(loader._iterator)
    return out, iterators


def test_persistent_workers_give_the_batches_of_fresh_workers_and_switch_epoch_policies(tmp_path, data_root):
    persistent = train_loader(tmp_path / "p", data_root, None)  # default: persistent with workers
    fresh = train_loader(tmp_path / "f", data_root, False)
    assert persistent.persistent_workers and not fresh.persistent_workers
    got, iterators = epochs_of(persistent)
    want, _ = epochs_of(fresh)
    # the same worker processes served every epoch
    assert iterators[0] is not None and all(it is iterators[0] for it in iterators)
    for epoch in range(EPOCHS):
        assert len(got[epoch]) == len(want[epoch]) == 2
        for (gi, gb), (wi, wb) in zip(got[epoch], want[epoch]):
            assert torch.equal(gi, wi)
            assert all(torch.equal(a, b) for a, b in zip(gb, wb))
    # multi-scale stops at epoch 1: from then on every batch has the configured size 96x160
    assert all(images.shape[-2:] == (96, 160) for epoch in (1, 2, 3) for images, _ in got[epoch])
    # epochs 1 and 2 augment the same images in the same order at the same size: the workers were re-seeded
    # per epoch (a replay of one epoch's draws would give equal batches)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(got[1], got[2]))
    # epoch 3: photometric distortion and flip are off, so the batches are the un-augmented images, built
    # here in the main process from the dataset in the sampler's order
    ds = persistent.dataset
    ds.set_epoch(3)
    order = [int(i.index) for i in persistent.sampler]  # sampler still in epoch 3
    reference = BatchImageCollateFunction(scales=None)
    for b, (images, boxes) in enumerate(got[3]):
        ref_images, ref_targets = reference([ds[i] for i in order[2 * b:2 * b + 2]])
        assert torch.equal(images, ref_images)
        assert all(torch.equal(a, t["boxes"]) for a, t in zip(boxes, ref_targets))


def test_persistent_workers_key_is_validated(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"train_dataloader.*persistent_workers.*'yes'.*true, false or null"):
        train_loader(tmp_path, data_root, "yes")
