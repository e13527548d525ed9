"""Build the datamodule, module, callbacks, logger and trainer of a config, and fit."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import OmegaConf

from dreamshot.config.load import to_yaml
from dreamshot.config.schema import Config
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.eval.callback import eval_callbacks
from dreamshot.models.wan.lora_formats import lora_modules
from dreamshot.planner.plan import shot_window
from dreamshot.training.callbacks import (
    LORA_FILE,
    ExportLora,
    PhaseProgressBar,
    RoleMaskPreview,
    TrainSummary,
    check_exportable,
)
from dreamshot.training.checkpoint_io import AtomicCheckpointIO
from dreamshot.training.guards import check_disk, check_writable, checkpoint_count, lora_checkpoint_bytes
from dreamshot.training.module import DreamShotModule
from dreamshot.training.strategy import build_strategy
from dreamshot.utils.errors import WeightsError
from dreamshot.utils.io import atomic_write_text, remove_stale_temporaries

CHECKPOINT_DIR = "checkpoints"

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
    logger = build_logger(cfg, out)
    trainer = build_trainer(cfg, out, logger, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.trainer.ckpt_path)
    return out


def build_trainer(cfg: Config, out: Path, logger: Logger, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    t = cfg.trainer
    checkpoints = ModelCheckpoint(
        dirpath=out / CHECKPOINT_DIR,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    artifacts = {
        "output_dir": str(out),
        "checkpoint_dir": str(out / CHECKPOINT_DIR),
        "lora": str(out / LORA_FILE),
        "logs": str(logger.log_dir if isinstance(logger, CSVLogger) else Path(logger.save_dir) / "wandb"),
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
            PhaseProgressBar(len(cfg.curriculum)),
            checkpoints,
            ExportLora(out),
            TrainSummary(out, artifacts),
            RoleMaskPreview(out, cfg.racl.mask_threshold),
            *eval_callbacks(cfg, out),
            *callbacks,
        ],
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out,
        enable_model_summary=False,
    )


def build_logger(cfg: Config, out: Path) -> Logger:
    if cfg.logger.backend == "csv":
        # A new version folder per launch: a resumed run keeps the metrics of the runs before it.
        return CSVLogger(save_dir=out, name="csv")
    # The environment wins so a user's WANDB_MODE=online (or disabled) is respected.
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    logger = WandbLogger(
        project=cfg.logger.project,
        name=cfg.name,
        group=cfg.logger.group,
        tags=list(cfg.tags),
        save_dir=str(out),
        mode=mode,
    )
    logger.log_hyperparams(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return logger
