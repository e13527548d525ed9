"""Checkpoint files written atomically and read without unpickling code (`weights_only=True`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from dreamshot.utils.errors import WeightsError
from dreamshot.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """`last_saved_step`: the step of the last checkpoint written whole (None before the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_saved_step: int | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        # Through a Python file, a full disk is an OSError (ENOSPC) rather than torch's opaque RuntimeError.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
        self.last_saved_step = checkpoint.get("global_step")

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist (trainer.ckpt_path)")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
            raise WeightsError(
                f"checkpoint {path} is not a readable DreamShot checkpoint ({type(e).__name__})"
            ) from None
