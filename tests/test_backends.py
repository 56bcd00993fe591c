"""CUDA backend settings (src/misc/backends.py): cuDNN autotuning and float32 matmul precision, and their keys."""
import pytest
import torch

from src.core import ConfigError, YAMLConfig
from src.misc.backends import configure_backends


@pytest.fixture
def restored():
    bench, precision, tf32 = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), \
        torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = bench, tf32
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("key,value,multiscale,deterministic,expected", [
    (None, "high", False, False, True),     # auto: fixed-size inputs are autotuned
    (None, "high", True, False, False),     # auto: multi-scale would re-time every new size
    (True, "high", True, False, True),      # explicit wins over auto
    (True, "high", False, True, False),     # deterministic always off
    (False, "highest", False, False, False),
])
def test_cuda_settings_follow_the_keys(restored, key, value, multiscale, deterministic, expected):
    got = configure_backends(torch.device("cuda"), key, value, multiscale, deterministic)
    assert got == {"cudnn_benchmark": expected, "float32_matmul_precision": value}
    assert torch.backends.cudnn.benchmark is expected and torch.get_float32_matmul_precision() == value
    assert torch.backends.cudnn.allow_tf32 is (value != "highest")


def test_on_cpu_nothing_is_changed(restored):
    torch.set_float32_matmul_precision("highest")
    assert configure_backends(torch.device("cpu"), True, "medium", False, False) == \
        {"cudnn_benchmark": None, "float32_matmul_precision": None}
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("key,value,fragment", [("cudnn_benchmark", "yes", "true, false or null"),
                                                ("float32_matmul_precision", "tf32", "highest, high, medium")])
def test_the_keys_are_validated_at_load_time(key, value, fragment):
    with pytest.raises(ConfigError, match=f"{key} = '{value}' is invalid: must be .*{fragment}"):
        YAMLConfig("configs/rtdetrv2_r18vd_coco.yaml", overrides={key: value})
