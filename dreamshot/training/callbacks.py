"""Training callbacks: LoRA export at the end of training and a loss summary people can read."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from dreamshot.utils.io import atomic_path, atomic_write_text
from dreamshot.viz.role_masks import role_mask_sheet

LORA_FILE = "lora.safetensors"
SUMMARY_FILE = "summary.json"
ROLE_MASKS_FILE = "debug/role_masks.png"


def save_lora(state: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write LoRA weights as safetensors (CPU, contiguous), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class ExportLora(L.Callback):
    """Writes `<output_dir>/lora.safetensors` when training ends (weights usable without the checkpoint)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LORA_FILE

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lora = pl_module.cfg.model.lora
        metadata = {
            "format": "peft",
            "rank": str(lora.rank),
            "alpha": str(lora.alpha),
            "step": str(trainer.global_step),
        }
        save_lora(pl_module.adapter.lora_state_dict(), self.path, metadata)


class TrainSummary(L.Callback):
    """Keeps the training loss of every step (across resumes) and writes `summary.json` at the end."""

    def __init__(self, output_dir: Path, artifacts: dict[str, str]) -> None:
        self.path = Path(output_dir) / SUMMARY_FILE
        self.artifacts = artifacts
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses = list(state_dict["losses"])

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = {"steps": trainer.global_step, **loss_trend(self.losses), **self.artifacts}
        atomic_write_text(self.path, json.dumps(summary, indent=2))


class RoleMaskPreview(L.Callback):
    """Draws the first training storyboard with its token-grid role masks (the RACL labels) into
    `<output_dir>/debug/role_masks.png`, and logs it to W&B when W&B is the logger."""

    def __init__(self, output_dir: Path, threshold: float) -> None:
        self.path, self.threshold = Path(output_dir) / ROLE_MASKS_FILE, threshold

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sheet = role_mask_sheet(trainer.datamodule.train_set[0], self.threshold)
        with atomic_path(self.path) as tmp:
            sheet.save(tmp, format="PNG")
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_image("debug/role_masks", [sheet])


def loss_trend(losses: list[float]) -> dict[str, float]:
    """Mean loss over the first and the last window of steps (window: a tenth of the run, 1 to 20 steps)."""
    if not losses:
        return {}
    window = max(1, min(20, len(losses) // 10))
    return {
        "loss_start": sum(losses[:window]) / window,
        "loss_end": sum(losses[-window:]) / window,
        "loss_window": window,
    }
