"""Guards that stop a run early and clearly instead of late and obscurely.

- `checkpoint_bytes`, `lora_files_bytes`: what the run's checkpoints and LoRA files take on disk, so that
  `train` can check that the output folder's disk holds them before training starts (`check_output_dir`).
- non-finite loss or gradients (checked by the LightningModule with the helpers below): the update is skipped
  (up to `trainer.max_nonfinite_steps` times) or the run stops with the step and the loss terms. Checkpoints are
  written only at good steps and atomically, so the last good one is kept.
"""

from __future__ import annotations

import math

import torch

from dreamshot.utils.errors import DreamShotError

# Zip record of one tensor in a torch.save archive (local header, name, alignment, central directory), generously.
TENSOR_RECORD_BYTES = 512
# What a checkpoint holds besides tensors: config text, loop and callback state.
CHECKPOINT_BASE_BYTES = 64 * 1024


class TrainingDivergedError(DreamShotError):
    """The loss or the gradients stopped being finite."""


def checkpoint_count(max_steps: int, every_n_steps: int) -> int:
    """Checkpoints a run keeps: one per `every_n_steps`, plus `last`."""
    return math.ceil(max_steps / max(every_n_steps, 1)) + 1


def checkpoint_bytes(trainable: list[torch.nn.Parameter], max_steps: int, deepspeed: bool = False) -> int:
    """An upper estimate of one checkpoint's size on disk.

    It holds the LoRA weights (their dtype) and AdamW's two moments (fp32), each tensor a record of the zip
    archive; DeepSpeed adds its fp32 master weights and the gathered LoRA copy (`ExportLora`). Around them: the
    config, the loops' state and the loss of every step (`TrainSummary`).
    """
    numel = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in trainable)
    size = weights + 8 * numel + TENSOR_RECORD_BYTES * 4 * len(trainable)
    if deepspeed:
        size += 4 * numel + weights + TENSOR_RECORD_BYTES * len(trainable)
    return size + CHECKPOINT_BASE_BYTES + 32 * max_steps


def lora_files_bytes(trainable: list[torch.nn.Parameter], formats: int) -> int:
    """The LoRA files written at the end of a run, one per export format (fp32 at most)."""
    return formats * sum(4 * p.numel() + TENSOR_RECORD_BYTES for p in trainable)


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
