"""The device a command runs on, checked before anything is built or written: a device this machine does not
have is one line naming the option or config key that asked for it, not a traceback from the first tensor
sent there."""

from __future__ import annotations

import torch

from dreamshot.utils.errors import ConfigError


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda(needed: int, setting: str, instead: str, key: str | None = None) -> None:
    """Raise a ConfigError unless this machine has `needed` CUDA devices; `setting` says what asked for them
    (`--device cuda:1`), `instead` what to do without them."""
    available = cuda_device_count()
    if available < needed:
        found = "no CUDA device" if available == 0 else f"{available} CUDA device{'s' * (available > 1)}"
        raise ConfigError(f"{setting}, but this machine has {found}: {instead}", key=key)


def pick_device(requested: str | None, what: str) -> torch.device:
    """The torch device `requested` by the option or config key `what` (`--device`, `eval.device`), checked to
    exist here; None: cuda when this machine has it, else cpu."""
    if requested is None:
        return torch.device("cuda" if cuda_device_count() else "cpu")
    setting = f"{what} {requested}" if what.startswith("-") else f"{what}={requested}"
    cpu = f"{what} cpu" if what.startswith("-") else f"{what}=cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{setting} is not a torch device (cpu, cuda, cuda:N)", key=what) from None
    if device.type == "cuda":
        require_cuda((device.index or 0) + 1, setting, f"use {cpu}", key=what)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting}, but this machine has no MPS device: use {cpu}", key=what)
    return device
