"""Build the datamodule, module, callbacks, logger and trainer of a config, and fit."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from dreamshot.config.load import check_weights, to_yaml
from dreamshot.config.schema import Config
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.eval.callback import eval_callbacks
from dreamshot.models.wan.lora_formats import lora_modules
from dreamshot.planner.plan import shot_window
from dreamshot.training.callbacks import (
    LORA_FILE,
    ExportLora,
    KeepNewestCheckpoints,
    RoleMaskPreview,
    TrainSummary,
    check_exportable,
)
from dreamshot.training.checkpoint_io import AtomicCheckpointIO
from dreamshot.training.ema import LoraEma
from dreamshot.training.guards import check_disk, check_writable, checkpoint_count, lora_checkpoint_bytes
from dreamshot.training.module import DreamShotModule
from dreamshot.training.progress import StepProgress
from dreamshot.training.samples import SampleStoryboard
from dreamshot.training.strategy import build_strategy
from dreamshot.utils.errors import WeightsError
from dreamshot.utils.io import atomic_write_text, remove_stale_temporaries

CHECKPOINT_DIR = "checkpoints"
STEP_CHECKPOINT = "step{step:06d}"
# The W&B run id of the run in an output folder (its resumes continue that run).
WANDB_RUN_ID_FILE = "wandb_run_id"

# The frozen VAE and umT5 stay in eval mode on purpose (WanAdapter.train); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# Lightning 2.6 calls a pytree check that this torch deprecates, on every fit: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoProductTips(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger") from every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoProductTips())


def train(cfg: Config, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Fit `cfg` and return its output folder (config.yaml, checkpoints/, lora.safetensors, summary.json, logs).

    `callbacks` are added to the run's own (notebooks and tests observe or steer a run with them).
    """
    out = Path(cfg.output_dir)
    # Everything that can be wrong with the inputs is found before anything is written.
    check_weights(cfg.model)
    if cfg.trainer.ckpt_path and not Path(cfg.trainer.ckpt_path).exists():  # a DeepSpeed checkpoint is a folder
        raise WeightsError(f"checkpoint {cfg.trainer.ckpt_path} does not exist (trainer.ckpt_path)")
    # Without a curriculum an epoch is a data pass, so raising max_steps extends a run with the same data stream.
    datamodule = StoryboardDataModule(
        cfg.data,
        out,
        cfg.seed,
        cfg.curriculum,
        cfg.trainer.accumulate_grad_batches,
        model=cfg.model,
        shot_window=functools.partial(shot_window, cfg),
    )
    if cfg.data.manifest is None:
        check_writable(out)  # the toy world is written into the output folder
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = DreamShotModule(cfg)
    cfg = module.cfg  # with model.lora as model.lora.init_from sets it
    check_exportable(lora_modules(module.adapter.lora_state_dict()))
    check_writable(out)
    checkpoints = checkpoint_count(cfg.trainer.max_steps, cfg.trainer.checkpoint_every_n_steps)
    check_disk(out, lora_checkpoint_bytes(module.adapter.trainable_parameters()), checkpoints)
    remove_stale_temporaries(out / CHECKPOINT_DIR)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loggers = build_loggers(cfg, out, resuming=cfg.trainer.ckpt_path is not None)
    trainer = build_trainer(cfg, out, loggers, callbacks)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.trainer.ckpt_path)
    except BaseException:
        finish_wandb(loggers, failed=True)
        raise
    finish_wandb(loggers)
    return out


def build_trainer(cfg: Config, out: Path, loggers: Sequence[Logger], callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    t = cfg.trainer
    checkpoints = ModelCheckpoint(
        dirpath=out / CHECKPOINT_DIR,
        filename=STEP_CHECKPOINT,
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    keep = t.keep_last_checkpoints
    csv_logger = next(logger for logger in loggers if isinstance(logger, CSVLogger))
    artifacts = {
        "output_dir": str(out),
        "checkpoint_dir": str(out / CHECKPOINT_DIR),
        "lora": str(out / LORA_FILE),
        "logs": str(out / "wandb" if cfg.logger.backend == "wandb" else csv_logger.log_dir),
        "metrics": str(Path(csv_logger.log_dir) / "metrics.csv"),
    }
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t, cfg.data.batch_size),
        precision=t.precision,
        max_steps=t.max_steps,
        # One epoch per curriculum phase (or per data pass); max_steps ends the run.
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        # BucketBatchSampler shards batches across ranks itself.
        use_distributed_sampler=False,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[
            StepProgress(len(cfg.curriculum), t.log_every_n_steps),
            checkpoints,
            *([KeepNewestCheckpoints(out / CHECKPOINT_DIR, keep)] if keep else []),
            # Before the export: at the end of training it puts the averaged weights in place.
            *([LoraEma(cfg.optim.ema_decay)] if cfg.optim.ema_decay else []),
            ExportLora(out),
            TrainSummary(out, artifacts),
            RoleMaskPreview(out, cfg.racl.mask_threshold),
            *([SampleStoryboard(cfg, out)] if t.sample.every_n_steps else []),
            *eval_callbacks(cfg, out),
            *callbacks,
        ],
        logger=list(loggers),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out,
        enable_model_summary=False,
    )


def build_loggers(cfg: Config, out: Path, resuming: bool) -> list[Logger]:
    """The run's loggers: W&B first when it is the backend (callbacks log images to it), and always a CSV logger,
    whose `csv/version_<n>/metrics.csv` (one version per launch) is what reports read back.

    A W&B run's id is kept in `<out>/wandb_run_id`, so a resumed run (`resuming`) continues the same W&B run
    instead of starting another of the same name; a fresh run gets a new id.
    """
    csv_logger = CSVLogger(save_dir=out, name="csv")
    if cfg.logger.backend == "csv":
        return [csv_logger]
    # The environment wins so a user's WANDB_MODE=online (or disabled) is respected.
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    wandb_logger = WandbLogger(
        project=cfg.logger.project,
        name=cfg.name,
        group=cfg.logger.group,
        tags=list(cfg.tags),
        save_dir=str(out),
        mode=mode,
        id=wandb_run_id(out, resuming),
        resume="allow",
    )
    wandb_logger.log_hyperparams(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return [wandb_logger, csv_logger]


def wandb_run_id(out: Path, resuming: bool) -> str:
    """The W&B run id of the run in `out`: the recorded one when resuming, else a new one, recorded."""
    path = out / WANDB_RUN_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [0-9a-z] too
    _record_run_id(path, run_id)
    return run_id


@rank_zero_only
def _record_run_id(path: Path, run_id: str) -> None:
    # Only rank 0 logs to W&B; other ranks' ids are never used and must not overwrite its record.
    atomic_write_text(path, f"{run_id}\n")


def finish_wandb(loggers: Sequence[Logger], failed: bool = False) -> None:
    """Close this process's W&B run, so that the next run in it (a sweep's next member) starts its own: W&B
    would hand a new `WandbLogger` the run still open."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
