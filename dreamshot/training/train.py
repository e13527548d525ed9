"""Build the datamodule, module, callbacks, logger and trainer of a config, and fit."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from dreamshot.config.load import check_weights, to_yaml
from dreamshot.config.schema import Config, TrainerConfig
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.eval.callback import eval_callbacks
from dreamshot.inference.loading import check_steps, read_lora, with_lora
from dreamshot.models.wan.lora_formats import lora_modules
from dreamshot.planner.plan import shot_window
from dreamshot.planner.workload import zero_stage
from dreamshot.training.callbacks import (
    EXPORT_FILES,
    LORA_FILE,
    ExportLora,
    KeepNewestCheckpoints,
    RoleMaskPreview,
    SaveOnInterrupt,
    StepCheckpoints,
    TrainSummary,
    check_exportable,
)
from dreamshot.training.checkpoint_io import AtomicCheckpointIO
from dreamshot.training.ema import LoraEma
from dreamshot.training.guards import checkpoint_bytes, checkpoint_count, lora_files_bytes
from dreamshot.training.module import DreamShotModule
from dreamshot.training.progress import StepProgress
from dreamshot.training.resume import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    Resume,
    check_checkpoint_lora,
    read_resume,
    resume_path,
)
from dreamshot.training.run_folder import RunLock, check_fresh_start, clear_run, record_resume
from dreamshot.training.samples import SampleStoryboard
from dreamshot.training.strategy import LoraDeepSpeedStrategy, build_strategy
from dreamshot.utils.devices import require_cuda
from dreamshot.utils.errors import DreamShotError, Terminated
from dreamshot.utils.io import atomic_write_text, check_output_dir, remove_stale_temporaries

STEP_CHECKPOINT = "step{step:06d}"
# The W&B run id of the run in an output folder (its resumes continue that run).
WANDB_RUN_ID_FILE = "wandb_run_id"

# The frozen VAE and umT5 stay in eval mode on purpose (WanAdapter.train); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# One run per output folder (run_folder): a resumed run's checkpoint folder is its own, not a collision.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Lightning 2.6 calls a pytree check that this torch deprecates, on every fit: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoProductTips(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger") from every run's output, and its
    notice of a Ctrl-C, which `SaveOnInterrupt`'s one line replaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") or "Detected KeyboardInterrupt" in message)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoProductTips())


def train(cfg: Config, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Fit `cfg` and return its output folder (config.yaml, checkpoints/, lora.safetensors, summary.json, logs).

    Everything that can be wrong with the inputs (machine, checkpoint, output folder, data, disk) is found
    before anything is written (`preflight`), and the folder is locked for the run's life (`run_folder`).
    `callbacks` are added to the run's own (notebooks and tests observe or steer a run with them).
    """
    out = Path(cfg.output_dir)
    launcher = rank_zero_only.rank == 0  # other ranks are started by it (or beside it) into the same run
    cfg = with_init_from(cfg)
    resume, datamodule, module = preflight(cfg, out, launcher)
    with RunLock(out) if launcher else contextlib.nullcontext():
        if cfg.trainer.overwrite and launcher:
            clear_run(out)
        datamodule.prepare_data()  # the toy world is written into the output folder
        datamodule.setup("fit")
        remove_stale_temporaries(out / CHECKPOINT_DIR)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
        if resume is not None and launcher:
            record_resume(out, resume)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        loggers = build_loggers(cfg, out, resuming=resume is not None)
        trainer = build_trainer(cfg, out, loggers, callbacks)
        try:
            fit(trainer, module, datamodule, resume, out)
        except BaseException:
            finish_wandb(loggers, failed=True)
            raise
        finish_wandb(loggers)
    return out


def with_init_from(cfg: Config) -> Config:
    """`cfg` with `model.lora` as its `model.lora.init_from` LoRA sets it (rank, alpha and targets from the file),
    so that a resume is compared with, and `config.yaml` records, what the run trains."""
    init_from = cfg.model.lora.init_from
    if init_from is None:
        return cfg
    return with_lora(cfg, read_lora(Path(init_from)), f"model.lora.init_from={init_from}")


def check_sampling_during_training(cfg: Config) -> None:
    """The storyboards drawn during training (`trainer.sample`, `eval.callback`) take a step count their sampler
    can run: a refused one would otherwise stop the run at its first drawing, far into training."""
    if cfg.trainer.sample.every_n_steps:
        check_steps(cfg.inference, cfg.trainer.sample.steps, "trainer.sample.steps")
    if cfg.eval.callback.enabled:
        check_steps(cfg.inference, cfg.eval.callback.steps, "eval.callback.steps")


def preflight(cfg: Config, out: Path, launcher: bool) -> tuple[Resume | None, StoryboardDataModule, DreamShotModule]:
    """Check the weights, the machine, the checkpoint to resume, the output folder, the data and the disk,
    writing nothing; returns the resume (None for a fresh run), the datamodule and the module."""
    check_weights(cfg.model)
    check_accelerator(cfg.trainer)
    check_sampling_during_training(cfg)
    if launcher:
        RunLock(out).check()
    checkpoint = resume_path(cfg, out)
    resume = read_resume(checkpoint, cfg) if checkpoint is not None else None
    if launcher:
        check_fresh_start(out, resume, cfg.trainer.overwrite)
    check_output_dir(out, "output_dir")
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
    if cfg.data.manifest is not None:  # a toy world is checked as it is written
        datamodule.prepare_data()
        datamodule.setup("fit")
    module = DreamShotModule(cfg)
    check_exportable(lora_modules(module.adapter.lora_state_dict()))
    if resume is not None:
        expected = module.adapter.lora_state_dict() if resume.peft_names else lora_parameters(module)
        check_checkpoint_lora(resume, expected)
    trainable = module.adapter.trainable_parameters()
    checkpoints = checkpoint_count(cfg.trainer.max_steps, cfg.trainer.checkpoint_every_n_steps)
    need = checkpoints * checkpoint_bytes(trainable, cfg.trainer.max_steps, zero_stage(cfg.trainer.strategy) > 0)
    need += lora_files_bytes(trainable, len(EXPORT_FILES))
    check_output_dir(out, "output_dir", need, f"the run's {checkpoints} checkpoints and LoRA files")
    return resume, datamodule, module


def fit(
    trainer: L.Trainer,
    module: DreamShotModule,
    datamodule: StoryboardDataModule,
    resume: Resume | None,
    out: Path,
) -> None:
    """`trainer.fit`; a disk that fills up, or a SIGTERM Lightning's handler stops the fit for (one before the
    first step or a second one: `SaveOnInterrupt`), is one line with the last checkpoint written whole."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else resume.path)
    except SIGTERMException:
        raise Terminated(
            f"terminated (SIGTERM) at step {trainer.global_step}: {_intact(trainer)}; continue with "
            "trainer.ckpt_path=last"
        ) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise DreamShotError(
            f"no space left on the disk of output_dir {out} at step {trainer.global_step}: {_intact(trainer)}; free "
            "space and continue with trainer.ckpt_path=last"
        ) from None


def _intact(trainer: L.Trainer) -> str:
    strategy = trainer.strategy
    # DeepSpeed writes its checkpoint folders itself, not through the checkpoint IO.
    writer = strategy if isinstance(strategy, LoraDeepSpeedStrategy) else strategy.checkpoint_io
    saved = writer.last_saved_step
    return f"checkpoints up to step {saved} intact" if saved is not None else "earlier checkpoints intact"


def check_accelerator(trainer: TrainerConfig) -> None:
    """`trainer.accelerator=gpu` needs as many CUDA devices as `trainer.devices` on this machine."""
    if trainer.accelerator not in ("gpu", "cuda"):
        return
    require_cuda(
        trainer.devices,
        f"trainer.accelerator={trainer.accelerator} with trainer.devices={trainer.devices}",
        "use trainer=cpu (or fewer trainer.devices)",
        key="trainer.accelerator",
    )


def lora_parameters(module: DreamShotModule) -> dict[str, torch.Tensor]:
    """The trainable weights by the names Lightning's checkpoints give them."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def build_trainer(cfg: Config, out: Path, loggers: Sequence[Logger], callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    t = cfg.trainer
    checkpoints = StepCheckpoints(
        dirpath=out / CHECKPOINT_DIR,
        filename=STEP_CHECKPOINT,
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
        # One run per folder (run_folder): a file under the name of a step is that run's, to be overwritten
        # when it resumes from an earlier step, never kept beside it as "-v1".
        enable_version_counter=False,
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
        # Lightning counts micro-batches; the config counts optimizer steps (whole ones: EpochBatches).
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[
            StepProgress(len(cfg.curriculum), t.log_every_n_steps),
            checkpoints,
            *([KeepNewestCheckpoints(out / CHECKPOINT_DIR, keep)] if keep else []),
            SaveOnInterrupt(out / CHECKPOINT_DIR / LAST_CHECKPOINT),
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
