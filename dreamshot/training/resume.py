"""Resuming a run (`trainer.ckpt_path`): the checkpoint is read and checked against the config before anything is
written, so a refused resume leaves the run it refused exactly as it was.

- `last` is the output folder's own `checkpoints/last.ckpt` (file or DeepSpeed folder; its backup when a DeepSpeed
  save was killed between its renames, as for a named checkpoint: `strategy.LoraDeepSpeedStrategy`), else the newest
  `hpc_ckpt_N.ckpt` Lightning's SLURM auto-requeue saved into the folder (docs/multinode.md); without either the
  run starts fresh, so one command line both starts a run and resumes it (a requeued cluster job).
- A LoRA `.safetensors` file, a folder that is not a DeepSpeed checkpoint, a truncated or foreign file: one line.
- The config may differ from the checkpoint's only in `RESUME_SAFE_KEYS`, and in curriculum phases not started
  yet (the current phase may change its length, not below the steps it has done, unless the checkpoint ends it:
  a finished phase, the last one too, is history). Any other change would make
  the resumed run differ from an uninterrupted run of the new config (the optimiser keeps its old learning rate,
  the data stream its old seed): it is refused, naming the keys. Accepted changes are recorded by the caller.
- `trainer.max_steps` (also as the sum of the phases) may change only under a constant learning rate: a linear
  or cosine schedule decays to it, so a new one would change the learning rate of every remaining step.
- `data.manifest` must be the file the checkpoint was trained on (its SHA-256 is in the checkpoint).
- The LoRA weights must have this config's names and shapes, and be finite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from dreamshot.config.schema import Config
from dreamshot.config.values import flat_items
from dreamshot.data.datamodule import MANIFEST_SHA256, StoryboardDataModule
from dreamshot.data.manifest import manifest_digest
from dreamshot.inference.loading import DEEPSPEED_MODEL_STATES
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY
from dreamshot.training.strategy import intact_checkpoint
from dreamshot.utils.errors import ConfigError, WeightsError

LAST = "last"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Lightning's SLURM auto-requeue saves these into the run folder (on SIGUSR1) and, left alone, would resume the
# newest itself, unchecked, when a job starts without a checkpoint path.
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
# Keys a resumed run may change: they name or place the run, say when to log, validate or checkpoint, how to
# execute the same computation, or what is drawn and scored; none changes a training step. A key ending in "."
# stands for every key under it. `trainer.max_steps` only with `optim.schedule=constant` (`_check_run_length`).
RESUME_SAFE_KEYS = (
    "name",
    "tags",
    "output_dir",
    "trainer.ckpt_path",
    "trainer.overwrite",
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps",
    "trainer.val_check_interval",
    "trainer.max_nonfinite_steps",
    "trainer.gradient_checkpointing",
    "trainer.keep_last_checkpoints",
    "trainer.sample.",
    "data.num_workers",
    "data.cache_dir",
    "data.cache_shard_size",
    "racl.diagnostic",
    "logger.",
    "inference.",
    "eval.",
)


@dataclass
class Resume:
    """A checkpoint to resume from: where, its step, what the config changes (key -> (old, new)), and its LoRA
    weights under the module's parameter names (`peft_names`: under peft's, as DeepSpeed folders keep them)."""

    path: Path
    step: int
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_names: bool = False


def resume_path(cfg: Config, out: Path) -> Path | None:
    """The checkpoint `trainer.ckpt_path` names (`last`: the output folder's, None when it has none yet)."""
    given = cfg.trainer.ckpt_path
    if not given:
        return None
    if given == LAST:
        last = intact_checkpoint(out / CHECKPOINT_DIR / LAST_CHECKPOINT)
        requeued = hpc_checkpoints(out)
        return last if last.exists() else (requeued[-1] if requeued else None)
    return intact_checkpoint(Path(given))


def hpc_checkpoints(out: Path) -> list[Path]:
    """The `hpc_ckpt_N.ckpt` files of Lightning's SLURM auto-requeue in the run folder `out`, oldest first."""
    found = [(match, path) for path in out.glob("hpc_ckpt_*.ckpt") if (match := HPC_CHECKPOINT.fullmatch(path.name))]
    return [path for match, path in sorted(found, key=lambda item: int(item[0].group(1)))]


def read_resume(path: Path, cfg: Config) -> Resume:
    """Read the checkpoint at `path` and check the config against the one it was trained with."""
    checkpoint, peft_names = _read_checkpoint(path)
    hyper_parameters = checkpoint.get("hyper_parameters")
    trained = hyper_parameters.get("config") if isinstance(hyper_parameters, dict) else None
    if not isinstance(trained, str) or "global_step" not in checkpoint:
        raise WeightsError(f"checkpoint {path} is not a DreamShot training checkpoint (trainer.ckpt_path)")
    step = int(checkpoint["global_step"])
    changes = config_changes(yaml.safe_load(trained) or {}, _as_dict(cfg), step)
    refused = {key: change for key, change in changes.items() if not _safe(key)}
    if refused:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(refused.items())[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise ConfigError(
            f"trainer.ckpt_path={path}: a resumed run must keep the checkpoint's settings, but this config changes "
            f"{shown}{more} (it would no longer equal an uninterrupted run); use the checkpoint's values, or start "
            "a new run (another output_dir, or trainer.overwrite=true)",
            key=next(iter(refused)),
        )
    _check_run_length(changes, cfg, path)
    _check_manifest(checkpoint, cfg, path)
    if cfg.trainer.max_steps < step:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps} is below the step of the checkpoint {path} ({step})",
            key="trainer.max_steps",
        )
    lora = checkpoint.get(CHECKPOINT_LORA_KEY) if peft_names else checkpoint.get("state_dict")
    if not isinstance(lora, dict):
        raise WeightsError(f"checkpoint {path} holds no LoRA weights (trainer.ckpt_path)")
    return Resume(path, step, changes, lora, peft_names)


def _check_run_length(changes: dict[str, tuple[Any, Any]], cfg: Config, path: Path) -> None:
    """A new `trainer.max_steps` is refused when the learning rate decays to it (the schedule itself is not
    resume-safe, so the checkpoint's schedule is this config's)."""
    if "trainer.max_steps" not in changes or cfg.optim.schedule == "constant":
        return
    old, new = changes["trainer.max_steps"]
    raise ConfigError(
        f"trainer.ckpt_path={path}: trainer.max_steps: {old} -> {new} is refused under optim.schedule="
        f"{cfg.optim.schedule}, which decays the learning rate to trainer.max_steps: every remaining step would get "
        f"a learning rate no uninterrupted run uses; keep trainer.max_steps={old}, or start a new run (another "
        "output_dir, or trainer.overwrite=true)",
        key="trainer.max_steps",
    )


def _check_manifest(checkpoint: dict[str, Any], cfg: Config, path: Path) -> None:
    """`data.manifest` must hold what it held when the checkpoint was written (same path, other lines: other
    storyboards, in another order). The toy world follows its config, compared already."""
    recorded = (checkpoint.get(StoryboardDataModule.__qualname__) or {}).get(MANIFEST_SHA256)
    manifest = cfg.data.manifest
    if recorded is None or manifest is None or not Path(manifest).is_file() or manifest_digest(manifest) == recorded:
        return
    raise ConfigError(
        f"trainer.ckpt_path={path}: data.manifest={manifest} changed since the checkpoint was written (its SHA-256 "
        "differs): the resumed run would train on other storyboards than the run it continues; restore the "
        "manifest, or start a new run (another output_dir, or trainer.overwrite=true)",
        key="data.manifest",
    )


def check_checkpoint_lora(resume: Resume, expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint's LoRA has every weight of `expected` (the module's trainable weights, by the checkpoint's
    naming), with the same shape, and only finite values."""
    for name, reference in expected.items():
        weight = resume.lora.get(name)
        if weight is None:
            raise WeightsError(
                f"checkpoint {resume.path} has no LoRA weight {name!r}: it was trained with another model or LoRA "
                "(model.*, model.lora.*)"
            )
        if tuple(weight.shape) != tuple(reference.shape):
            raise WeightsError(
                f"checkpoint {resume.path}: LoRA weight {name!r} has shape {tuple(weight.shape)}, this config's "
                f"{tuple(reference.shape)} (model.lora.rank and the model must be the run's)"
            )
        if not torch.isfinite(weight).all():
            raise WeightsError(
                f"checkpoint {resume.path}: LoRA weight {name!r} holds NaN or infinite values; resume from an "
                "earlier checkpoint"
            )


def config_changes(trained: dict[str, Any], now: dict[str, Any], step: int) -> dict[str, tuple[Any, Any]]:
    """key -> (trained value, new value) for every setting that differs, curriculum phases not started by
    `step` left out (keys that only one side has, from another version of the schema, are not compared)."""
    old, new = dict(flat_items(_without(trained, "curriculum"))), dict(flat_items(_without(now, "curriculum")))
    changes = {key: (old[key], new[key]) for key in old.keys() & new.keys() if old[key] != new[key]}
    changes.update(_curriculum_changes(trained.get("curriculum") or [], now.get("curriculum") or [], step))
    return dict(sorted(changes.items()))


def _curriculum_changes(trained: list[dict], now: list[dict], step: int) -> dict[str, tuple[Any, Any]]:
    """Changes to the phases started before `step`; the last of them, unless `step` ends it, may grow or shrink
    to no fewer steps than it has done. A phase that `step` ends is history like the phases before it: its
    checkpoint is at the end of its epoch, from which the resumed run goes on with the next phase. A run without a
    curriculum that gains one (or the reverse) changes the whole curriculum."""
    if step > 0 and bool(trained) != bool(now):
        return {"curriculum": (trained, now)}
    changes: dict[str, tuple[Any, Any]] = {}
    starts = [sum(phase["steps"] for phase in trained[:i]) for i in range(len(trained))]
    started = [i for i, start in enumerate(starts) if start < step]
    for i in started:
        if i >= len(now):
            changes[f"curriculum[{i}]"] = (trained[i], None)
            continue
        for key, value in trained[i].items():
            done = step - starts[i]
            if key == "steps" and i == started[-1] and done < value and now[i]["steps"] >= done:
                continue
            if now[i].get(key) != value:
                changes[f"curriculum[{i}].{key}"] = (value, now[i].get(key))
    return changes


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], bool]:
    """The checkpoint's content (a DeepSpeed folder: its model-states file, mapped, not read) and whether its
    LoRA weights carry peft names (DeepSpeed) rather than the module's."""
    where = f"trainer.ckpt_path={path}"
    if path.suffix == ".safetensors":
        raise WeightsError(
            f"{where} is a LoRA file, not a training checkpoint: to start training from it, set "
            f"model.lora.init_from={path} instead"
        )
    if not path.exists():
        raise WeightsError(f"checkpoint {path} does not exist (trainer.ckpt_path)")
    peft_names = path.is_dir()
    if peft_names:
        states = next((path / name for name in DEEPSPEED_MODEL_STATES if (path / name).is_file()), None)
        if states is None:
            raise WeightsError(
                f"{where} is a folder but not a DeepSpeed checkpoint (no {' or '.join(DEEPSPEED_MODEL_STATES)})"
            )
        path = states
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise WeightsError(
            f"checkpoint {path} (trainer.ckpt_path) is not a readable DreamShot checkpoint: truncated, or not a "
            f"checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"checkpoint {path} is not a DreamShot training checkpoint (trainer.ckpt_path)")
    return checkpoint, peft_names


def _as_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def _safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS)
