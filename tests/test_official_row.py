"""bench/official_model.py: the official package is imported beside this repo's `src` without replacing it,
gets the weights strictly, and a comparison of two different functions is refused."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import src.core
from bench.latency_bench import REPO, paired_ratio, portable_arg, speed_vs_official
from bench.official_model import OFFICIAL_CONFIG, check_same_outputs, load_official

FAKE_CORE = '''
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        self.deployed = False
    def deploy(self):
        self.deployed = True
        return self
    def forward(self, images):
        return self.head(images.mean(dim=(2, 3)))

class Post(nn.Module):
    def deploy(self):
        return self
    def forward(self, logits, sizes):
        scores, labels = logits.sigmoid().max(-1)
        return labels[:, None], sizes[:, None, :].repeat(1, 1, 2).float(), scores[:, None]

class YAMLConfig:
    OFFICIAL = True
    def __init__(self, path, **kwargs):
        self.kwargs = kwargs
        self.model, self.postprocessor = Model(kwargs["num_classes"]), Post()
'''


@pytest.fixture()
def official_root(tmp_path):
    (tmp_path / "src" / "core").mkdir(parents=True)
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "core" / "__init__.py").write_text(textwrap.dedent(FAKE_CORE))
    (tmp_path / OFFICIAL_CONFIG).parent.mkdir(parents=True)
    (tmp_path / OFFICIAL_CONFIG).write_text("{}\n")
    return tmp_path


def weights(num_classes=4):
    torch.manual_seed(0)
    return {f"head.{k}": v for k, v in torch.nn.Linear(3, num_classes).state_dict().items()}


def test_the_official_package_loads_beside_this_repos_src_and_leaves_it_in_place(official_root):
    ours = {k: v for k, v in sys.modules.items() if k == "src" or k.startswith("src.")}
    sd = weights()
    model = load_official(str(official_root), (32, 48), 4, sd)
    assert model.model.deployed and torch.equal(model.model.head.weight, sd["head.weight"])
    assert {k: v for k, v in sys.modules.items() if k == "src" or k.startswith("src.")} == ours
    assert sys.modules["src.core"] is src.core and not hasattr(src.core.YAMLConfig, "OFFICIAL")
    assert str(official_root) not in sys.path


def test_a_state_dict_the_official_model_does_not_have_is_refused_with_the_keys(official_root):
    sd = dict(weights(), extra=torch.zeros(1))
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        load_official(str(official_root), (32, 48), 4, sd)
    assert sys.modules["src.core"] is src.core


def test_a_folder_without_the_official_layout_is_refused_with_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not an extracted rtdetrv2_pytorch folder.*lyuwenyu/RT-DETR"):
        load_official(str(tmp_path), (32, 48), 4, weights())


def test_detections_of_two_different_functions_are_refused(official_root):
    official = load_official(str(official_root), (32, 48), 4, weights())
    same = load_official(str(official_root), (32, 48), 4, weights())
    other = load_official(str(official_root), (32, 48), 4, {k: -v for k, v in weights().items()})
    images, sizes = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([[48, 32]] * 3)
    assert check_same_outputs(official, same, images, sizes) == 0.0
    with pytest.raises(ValueError, match="differ from plain_p5's"):
        check_same_outputs(official, other, images, sizes)


def test_speed_against_the_official_row_is_official_over_model_per_setting():
    row = lambda model, ms, batch=1: {"model": model, "device": "cpu", "dtype": "float32", "input": "64x64",  # noqa
                                      "batch": batch, "median_ms": ms}
    lines = speed_vs_official([row("official", 100.0), row("plain_p5", 80.0), row("dset_k0.3_moe", 125.0),
                               row("plain_p5", 10.0, batch=8)])
    assert lines == ["", "- speed against the official implementation, cpu float32 64x64 batch 1 (official median / "
                         "model median, > 1 is faster): plain_p5 1.250x, dset_k0.3_moe 0.800x"]
    paired = {**row("plain_p5", 80.0), "vs_official": {"median": 1.2, "p25": 1.1, "p75": 1.3}}
    assert speed_vs_official([row("official", 100.0), paired])[1].endswith(
        "plain_p5 1.250x (paired 1.200x, p25-p75 1.100-1.300)")


def test_the_paired_ratio_divides_out_a_slow_stretch_that_the_ratio_of_medians_keeps():
    """Rounds 3-5 of 5 ran on a loaded machine (x1.5 for both calls): each round's ratio is 1.25, while the
    ratio of the medians compares a slow official round with a fast model one."""
    official = [100.0, 100.0, 150.0, 150.0, 150.0]
    model = [80.0, 80.0, 120.0, 120.0, 120.0]
    assert paired_ratio(official, model) == {"median": 1.25, "p25": 1.25, "p75": 1.25}
    assert paired_ratio([100.0, 200.0, 300.0], [100.0, 100.0, 100.0]) == {"median": 2.0, "p25": 1.5, "p75": 2.5}
    with pytest.raises(ValueError, match="pair round by round"):
        paired_ratio([100.0, 200.0], [100.0])


def test_the_recorded_command_names_no_machine_path():
    path = "/some/machine/RT-DETR/rtdetrv2_pytorch"
    inside = str(REPO / "docs" / "results" / "latency.json")
    args = ["--official", path, "--official=" + path, "--quick", "--out", inside, "--out=/root/out/x.json", "64x64",
            "data_root=/root/coco", "a.b=3", str(REPO), str(REPO / "docs" / ".." / "configs")]
    assert [portable_arg(a) for a in args] == ["--official", "PATH/rtdetrv2_pytorch", "--official=PATH/rtdetrv2_pytorch",
                                              "--quick", "--out", "docs/results/latency.json", "--out=PATH/x.json",
                                              "64x64", "data_root=PATH/coco", "a.b=3", ".", "configs"]


def test_the_official_row_runs_as_deployed_unless_asked_for_channels_last():
    """By default the official row keeps its layout (as the official code deploys); --official-channels-last
    converts its conv weights and its images, with the same outputs; the flag without --official is refused."""
    from bench.latency_bench import parse_args
    from bench.official_model import OfficialDeployModel

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.seen = None

        def forward(self, images):
            self.seen = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
            return self.conv(images).mean(dim=(2, 3))

    class Post(torch.nn.Module):
        def forward(self, logits, sizes):
            return logits, sizes

    torch.manual_seed(0)
    images, sizes = torch.rand(2, 3, 8, 10), torch.tensor([[10, 8], [20, 16]])
    plain = OfficialDeployModel(Model(), Post())
    last = OfficialDeployModel(Model(), Post(), torch.channels_last)
    last.model.conv.load_state_dict(plain.model.conv.state_dict())
    with torch.no_grad():
        want, got = plain(images, sizes), last(images, sizes)
    assert plain.model.conv.weight.is_contiguous() and not plain.model.seen
    assert last.model.conv.weight.is_contiguous(memory_format=torch.channels_last) and last.model.seen
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        parse_args(["--official-channels-last"])
