"""Guards that stop a run early and clearly instead of late and obscurely.

- `check_writable`, `check_disk`: the output folder is writable and its disk can hold the run's checkpoints,
  checked before training starts.
- non-finite loss or gradients (checked by the LightningModule with the helpers below): the update is skipped
  (up to `trainer.max_nonfinite_steps` times) or the run stops with the step and the loss terms. Checkpoints are
  written only at good steps and atomically, so the last good one is kept.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from dreamshot.utils.errors import DreamShotError


class TrainingDivergedError(DreamShotError):
    """The loss or the gradients stopped being finite."""


def check_writable(out: Path) -> None:
    """Create `out` and write a file in it, or raise a DreamShotError naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DreamShotError(f"output_dir {out} is not writable ({e.strerror or type(e).__name__})") from None


def check_disk(out: Path, checkpoint_bytes: int, checkpoints: int) -> None:
    """Raise a DreamShotError if the disk of `out` lacks room for `checkpoints` of `checkpoint_bytes`."""
    needed = checkpoint_bytes * checkpoints
    free = shutil.disk_usage(out).free
    if free < needed:
        raise DreamShotError(
            f"output_dir {out}: {free / 2**30:.2f} GiB free, the run's {checkpoints} checkpoints need about "
            f"{needed / 2**30:.2f} GiB (raise trainer.checkpoint_every_n_steps or free space)"
        )


def checkpoint_count(max_steps: int, every_n_steps: int) -> int:
    """Checkpoints a run keeps: one per `every_n_steps`, plus `last`."""
    return math.ceil(max_steps / max(every_n_steps, 1)) + 1


def lora_checkpoint_bytes(trainable: list[torch.nn.Parameter]) -> int:
    """A checkpoint holds the LoRA weights and AdamW's two moments, all in the weights' dtype."""
    return sum(3 * p.numel() * p.element_size() for p in trainable)


def finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return all(
        torch.isfinite(p.grad).all() for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    )


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """AdamW leaves parameters without a gradient untouched: the coming optimiser step makes no update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def describe(losses: dict[str, torch.Tensor]) -> str:
    """'loss=nan, loss_fm=0.93, loss_racl=nan' from a step's loss terms."""
    return ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(losses.items()) if k.startswith("loss"))
