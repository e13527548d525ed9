"""Training callbacks: LoRA export (every format) at the end of training, a loss summary people can read, the
step checkpoints, and the checkpoint saved when the user or a scheduler stops training."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from dreamshot.config.schema import ModelConfig
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.lora_formats import (
    CONVERTERS,
    FORMATS,
    WAN_OUTER_LINEARS,
    base_model_record,
    lora_modules,
    unwritable_modules,
)
from dreamshot.utils.errors import ConfigError, Interrupted, Terminated
from dreamshot.utils.io import atomic_path, atomic_write_text
from dreamshot.viz.role_masks import role_mask_sheet

LORA_FILE = "lora.safetensors"
# One file per export format, in the run folder (and in `dreamshot export --out`).
EXPORT_FILES = {"peft": LORA_FILE, "diffusers": "lora_diffusers.safetensors", "comfyui": "lora_comfyui.safetensors"}
# Under DeepSpeed, where a checkpoint holds shards, the gathered LoRA (peft names) is kept under this key.
CHECKPOINT_LORA_KEY = "lora_state_dict"
SUMMARY_FILE = "summary.json"
ROLE_MASKS_FILE = "debug/role_masks.png"


def save_lora(state: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write LoRA weights as safetensors (CPU, contiguous), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class ExportLora(L.Callback):
    """Writes the LoRA into the output folder in every format of `EXPORT_FILES` when training ends (weights
    usable without the checkpoint, by DreamShot, diffusers and ComfyUI).

    Every rank takes part (under DeepSpeed the fp32 master weights are assembled from all of them); rank 0 writes.
    Under DeepSpeed, whose checkpoints hold each rank's shards only, every checkpoint also gets the gathered LoRA
    (`CHECKPOINT_LORA_KEY`, fp32 masters), so `dreamshot export` reads any checkpoint without a conversion step.
    """

    def __init__(self, output_dir: Path, formats: Sequence[str] = FORMATS) -> None:
        self.output_dir, self.formats = Path(output_dir), tuple(formats)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            checkpoint[CHECKPOINT_LORA_KEY] = gathered_lora(trainer, pl_module.adapter)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = gathered_lora(trainer, pl_module.adapter)
        if trainer.is_global_zero:
            metadata = {"step": str(trainer.global_step)}
            write_lora_files(state, self.output_dir, pl_module.cfg.model, metadata, self.formats)


def gathered_lora(trainer: L.Trainer, adapter: WanAdapter) -> dict[str, torch.Tensor]:
    """The full LoRA weights (peft names) copied to the CPU: the module's own, or under DeepSpeed the fp32 master
    weights of its optimiser, which are what training trained (its bf16 mode keeps bf16-rounded copies in the
    module). DeepSpeed assembles each master from the ranks' partitions (ZeRO-2: an all-reduce, ZeRO-3: an
    all-gather): every rank must enter, for the same weights in the same order. Needs the engine's optimiser, as
    every training hook has it."""
    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        return {key: value.detach().to("cpu", copy=True) for key, value in adapter.lora_state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param  # only under DeepSpeed, where it is running already

    masters = {
        name: safe_get_full_fp32_param(parameter)
        for name, parameter in adapter.transformer.named_parameters()
        if parameter.requires_grad
    }
    return {key: value.to("cpu", copy=True) for key, value in adapter.lora_state_dict(masters).items()}


def write_lora_files(
    state: dict[str, torch.Tensor],
    output_dir: Path,
    model: ModelConfig,
    metadata: dict[str, str],
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Write `state` (peft names, trained under `model.lora`) once per format into `output_dir` (`EXPORT_FILES`
    names), each file recording its base model; returns the paths. Nothing is written unless every format can
    hold every module."""
    check_exportable(lora_modules(state), formats)
    paths = []
    for name in formats:
        converted = CONVERTERS[name](state, model.lora.alpha)
        path = Path(output_dir) / EXPORT_FILES[name]
        save_lora(converted.tensors, path, {**converted.metadata, **base_model_record(model), **metadata})
        paths.append(path)
    return paths


def check_exportable(modules: set[str], formats: Sequence[str] = FORMATS) -> None:
    """ConfigError unless every format can hold a LoRA on each of `modules`: run before training, so a run never
    trains to find at its end that it cannot write its files."""
    for name in formats:
        unwritable = unwritable_modules(name, modules)
        if unwritable:
            raise ConfigError(
                f"model.lora.target_modules: the {name} export cannot hold a LoRA on {unwritable[0]!r} (it holds "
                f"the block linears and {', '.join(WAN_OUTER_LINEARS)}; {len(unwritable)} module(s) outside them)"
            )


class KeepNewestCheckpoints(L.Callback):
    """Removes all but the newest `keep` step checkpoints (`step<N>.ckpt`, files or DeepSpeed folders) of
    `folder` after each save; `last.ckpt` is never touched. Placed after the checkpoint callback."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = Path(folder), keep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._prune(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prune(trainer)

    def _prune(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:  # rank 0 alone lists and removes: another rank could see a file vanish
            return
        steps = sorted(self.folder.glob("step*.ckpt"), key=lambda path: (_step_of(path), path.stat().st_mtime))
        for path in steps[: -self.keep]:
            trainer.strategy.remove_checkpoint(path)  # a DeepSpeed folder as a whole


def _step_of(path: Path) -> int:
    """6 of `step000006.ckpt` (or `step000006-v1.ckpt`)."""
    digits = path.stem.removeprefix("step").split("-")[0]
    return int(digits) if digits.isdigit() else -1


class TrainSummary(L.Callback):
    """Keeps the training loss of every optimizer step (the mean of its micro-batches, across resumes) and
    writes `summary.json` at the end."""

    def __init__(self, output_dir: Path, artifacts: dict[str, str]) -> None:
        self.path = Path(output_dir) / SUMMARY_FILE
        self.artifacts = artifacts
        self.losses: list[float] = []
        self._summarised = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, means = pl_module.step_means
        # Once per optimizer step, at its end; none for a step whose every micro-batch had a non-finite loss.
        if step == trainer.global_step - 1 and step != self._summarised:
            self._summarised = step
            self.losses.append(float(means["loss"]))

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


class StepCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint under a state key without its interval (Lightning's holds
    `every_n_train_steps`), so a run resumed with another `trainer.checkpoint_every_n_steps` gets its state back.
    `last.ckpt` is saved at the last step (`trainer.max_steps`) too, interval or not: Lightning's would stay at the
    last multiple of the interval, and a resume that extends the run, or an export, would lose the steps after it."""

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step >= trainer.max_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SaveOnInterrupt(Checkpoint):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption or time limit, `scancel`, Kubernetes) while training:
    the optimiser step under way finishes (every micro-batch of it), `last.ckpt` is saved, and the run stops with
    `Interrupted` (status 130) or `Terminated` (143) naming the step, so no work since the previous checkpoint is
    lost and `trainer.ckpt_path=last` continues as if the run had never stopped. A second signal goes to the
    handler that was there before: a second Ctrl-C stops at once, a second SIGTERM at the end of the batch
    (Lightning's; `train.fit` names the last checkpoint).

    For the steps, SIGTERM is taken from Lightning's own handler (restored after), which would stop at the end of
    the batch under way, mid-accumulation too, without a checkpoint, and exit with status 0; one it caught
    (`trainer.received_sigterm`: before training started, or a second one) is taken at the next step. Lightning's
    SLURM auto-requeue (on SIGUSR1, when the job asks for it: an `hpc_ckpt_N.ckpt` and `scontrol requeue`) is
    left as it is; docs/multinode.md says how the two meet.

    A `Checkpoint` so that Lightning runs it after `StepCheckpoints` at the same step; every rank takes the
    decision together (a rank may be the only one signalled), since saving a checkpoint is collective.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, last_checkpoint: Path) -> None:
        self.path = Path(last_checkpoint)
        self.received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}

    def _request(self, signum, frame) -> None:
        self.received = self.received or signum
        signal.signal(signum, self._previous_handlers[signum])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        # A SIGTERM Lightning's handler caught counts as one of ours.
        signum = self.received or (signal.SIGTERM if trainer.received_sigterm else None)
        if not stepped or not trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
            return
        # A rank that was not signalled says what the others were sent.
        terminated = trainer.strategy.reduce_boolean_decision(signum == signal.SIGTERM, all=False)
        trainer.save_checkpoint(self.path, weights_only=False)
        kept = f"at step {trainer.global_step}: saved {self.path}; continue with trainer.ckpt_path=last"
        if terminated:
            raise Terminated(f"terminated (SIGTERM) {kept}")
        raise Interrupted(f"interrupted {kept}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
