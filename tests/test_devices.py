"""The device a command asks for is checked before anything is built: one line naming the option or key."""

import pytest
import torch

from dreamshot.utils.devices import pick_device
from dreamshot.utils.errors import ConfigError


@pytest.fixture
def one_gpu(monkeypatch):
    """This machine, seen as one with a single CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_device_the_machine_has_is_taken_and_cuda_is_the_default_where_there_is_one(one_gpu):
    assert pick_device(None, "--device") == torch.device("cuda")
    assert pick_device("cuda:0", "--device") == torch.device("cuda", 0)
    assert pick_device("cpu", "eval.device") == torch.device("cpu")


def test_a_device_the_machine_lacks_is_named_with_what_asked_for_it(one_gpu):
    with pytest.raises(ConfigError, match=r"^--device cuda:1, but this machine has 1 CUDA device: use --device cpu$"):
        pick_device("cuda:1", "--device")
    with pytest.raises(ConfigError, match=r"^eval.device=gpu is not a torch device \(cpu, cuda, cuda:N\)$"):
        pick_device("gpu", "eval.device")


def test_without_cuda_the_default_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None, "--device") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        pick_device("cuda", "--device")
