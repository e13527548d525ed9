"""Checkpoint files written atomically and read without unpickling code (`weights_only=True`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from dreamshot.utils.errors import WeightsError
from dreamshot.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

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
