"""device=auto|cpu|cuda|cuda:N against what this machine has."""

import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.device import resolve_device


def test_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(("name", "fragment"), [("tpu", "not a device"), ("meta", "not supported")])
def test_bad_devices_are_one_line(name, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(name):
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device(name)


def test_a_cuda_index_beyond_the_machine_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="1 CUDA device"):
        resolve_device("cuda:1")
