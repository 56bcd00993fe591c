"""src/nn/pooling.py: the stem max pool equals F.max_pool2d exactly where it takes its own path, and leaves
gradients, graph export and other devices to F.max_pool2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.nn.pooling import stem_max_pool


@pytest.mark.parametrize("shape", [(1, 64, 40, 40), (2, 3, 7, 5), (1, 2, 1, 1), (1, 2, 2, 3), (1, 4, 9, 1), (1, 1, 6, 8)])
def test_the_stem_max_pool_equals_max_pool2d_exactly_on_odd_even_and_tiny_maps(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x[x < -1.0] = 0.0                                       # ties, as after a ReLU
    x.view(-1)[:: max(1, x.numel() // 7)] = float("-inf")   # and -inf inputs
    with torch.no_grad():
        torch.testing.assert_close(stem_max_pool(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)
        x.view(-1)[x.numel() // 2] = float("nan")
        got, ref = stem_max_pool(x), F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_with_a_gradient_the_stem_max_pool_gives_max_pool2d_its_gradient_on_ties():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)  # every window tied: max pooling gives each gradient to one input
    stem_max_pool(x).sum().backward()
    ref = torch.zeros(1, 1, 4, 4, requires_grad=True)
    F.max_pool2d(ref, 3, 2, 1).sum().backward()
    assert torch.equal(x.grad, ref.grad) and set(x.grad.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_a_traced_stem_max_pool_is_one_max_pool_operator():
    graph = torch.jit.trace(lambda t: stem_max_pool(t), torch.rand(1, 2, 8, 8)).graph
    kinds = [n.kind() for n in graph.nodes()]
    assert "aten::max_pool2d" in kinds and "aten::maximum" not in kinds


def test_channels_last_integer_and_empty_maps_get_max_pool2d_itself():
    x = torch.randn(2, 3, 9, 6, generator=torch.Generator().manual_seed(1))
    last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = stem_max_pool(last)
        assert torch.equal(got, F.max_pool2d(x, 3, 2, 1)) and got.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError):  # F.max_pool2d's own refusal, not a silent result
            stem_max_pool(torch.zeros(1, 1, 4, 4, dtype=torch.bool))


def test_the_pool_bench_prints_both_pools_alone_and_in_a_whole_forward(capsys):
    from bench import stem_pool_bench

    assert stem_pool_bench.main(["--input", "160x192", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("stem map (1, 64, 80, 96)")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["F.max_pool2d", "stem_max_pool"]
    assert all("plain_p5 forward 160x192" in line for line in lines[1:])
    import src.nn.backbone.presnet as presnet
    assert presnet.stem_max_pool is stem_max_pool  # restored
