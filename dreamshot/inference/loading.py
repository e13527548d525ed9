"""A trained DreamShot model for inference: the run's config, the backbone, and its LoRA weights.

Weights come from a run folder (`lora.safetensors`, else `checkpoints/last.ckpt`), a LoRA in any format
`models/wan/lora_files.py` reads (DreamShot's exports, diffusers, a peft adapter folder, ComfyUI, musubi-tuner),
a Lightning `.ckpt` or DeepSpeed checkpoint folder of this project (of a run with `optim.ema_decay`: the
average of its weights, as the run's LoRA files hold it), or nothing (the bare backbone). The config
builds the backbone: `--config` when given, else the run's `config.yaml`, found beside the LoRA file or one
folder up (`<run>/checkpoints/x.ckpt`). Rank, alpha and target modules come from the LoRA itself
(`lora_config_for`: a config value other than its default must agree with them); a checkpoint records them in
the config it was trained with. A model loaded here only samples, so `load_model` also sets it up for sampling as
`inference` says: a second LoRA stacked on the first (`second_lora`, read the same way), the adapters' scales, the
LoRA folded into the base weights (`merge_lora`) and compiled blocks (`compile`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamshot.config.load import check_weights, load_config
from dreamshot.config.schema import Config, InferenceConfig, ModelConfig
from dreamshot.inference.pipeline import build_scheduler
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.block_cache import cache_config
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora import (
    OWN_ADAPTER,
    SECOND_ADAPTER,
    add_weight_deltas,
    check_lora_fits,
    lora_config_for,
    set_lora_scales,
    stack_lora,
)
from dreamshot.models.wan.lora_files import DIFFUSERS_WEIGHTS, PEFT_CONFIG, LoraWeights, read_lora_file
from dreamshot.models.wan.lora_formats import base_model_record
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY, LORA_FILE
from dreamshot.training.ema import LoraEma
from dreamshot.training.strategy import intact_checkpoint
from dreamshot.utils.errors import ConfigError, WeightsError

DEEPSPEED_MODEL_STATES = (
    "checkpoint/mp_rank_00_model_states.pt",
    "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt",
)
RUN_CONFIG = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Prefix of the LoRA keys in a Lightning checkpoint's state_dict (DreamShotModule.adapter.transformer).
CHECKPOINT_PREFIX = "adapter.transformer."
# peft's parameter names carry the adapter name; its state-dict names (`lora_state_dict`) do not.
ADAPTER_NAME = ".default."
# Where a checkpoint keeps the LoRA average of `optim.ema_decay`: Lightning's state key of the callback.
EMA_STATE_KEY = LoraEma.__qualname__


def add_weight_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """`--run | --lora | --base` (one required) and `--config`; returns the group so a command can add sources."""
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--run", type=Path, help="training run folder (config.yaml + lora.safetensors or last.ckpt)")
    weights.add_argument(
        "--lora",
        type=Path,
        help="LoRA weights: .safetensors (DreamShot, diffusers, ComfyUI, musubi), peft folder, .ckpt",
    )
    weights.add_argument("--base", action="store_true", help="no LoRA: the bare backbone")
    parser.add_argument("--config", help="experiment name or yaml to build the model (default: the run's config.yaml)")
    return weights


def run_weights(run_dir: Path) -> Path:
    """The LoRA file of a run folder: the exported safetensors, else the last checkpoint (a file, or under DeepSpeed
    a folder, or its backup when a save was killed between its renames: `intact_checkpoint`)."""
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {RUN_CONFIG})")
    if (run_dir / LORA_FILE).is_file():
        return run_dir / LORA_FILE
    last = intact_checkpoint(run_dir / LAST_CHECKPOINT)
    if last.exists():
        return last
    raise WeightsError(f"{run_dir}: neither {LORA_FILE} nor {LAST_CHECKPOINT} found (has the run trained?)")


def weights_and_config(args, overrides: list[str]) -> tuple[Path | None, Config]:
    """The LoRA weights named by `--run` / `--lora` (`add_weight_arguments`; None for `--base`) and the config
    to build their model from (`resolve_config`)."""
    weights = run_weights(args.run) if args.run else args.lora
    return weights, resolve_config(weights, args.config, overrides)


def resolve_config(weights: Path | None, config: str | None, overrides: list[str]) -> Config:
    """The config to build the model from: `config`, else the run's `config.yaml` next to `weights`."""
    if config is not None:
        return load_config(config, overrides)
    if weights is None:
        return load_config(None, overrides)
    for folder in (weights.parent, weights.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return load_config(folder / RUN_CONFIG, overrides)
    raise ConfigError(f"{weights}: no {RUN_CONFIG} beside it or one folder up; pass --config EXPERIMENT_OR_YAML")


def build_adapter(cfg: Config, device: torch.device | str = "cpu") -> WanAdapter:
    """The backbone of `cfg` in eval mode on `device`, LoRA initialised (B = 0: the bare model's output).

    A randomly initialised (tiny) backbone is drawn under `cfg.seed` exactly as `DreamShotModule` draws it, so
    LoRA weights trained on it apply to the same frozen weights here. A full-size model without its weights is
    refused before anything is built (`check_weights`).
    """
    check_weights(cfg.model)
    return WanAdapter.seeded(cfg.model, cfg.seed, compiled=cfg.inference.compile).to(device).eval()


def load_model(
    cfg: Config,
    weights: Path | None,
    device: torch.device | str = "cpu",
    lora: LoraWeights | None = None,
    second: LoraWeights | None = None,
) -> tuple[Config, WanAdapter]:
    """The backbone of `cfg` on `device` with the LoRA of `weights` (None: none; `lora`: its weights, already
    read), set up for sampling (`prepare_sampling`; `second`: `inference.second_lora` already read by
    `check_sampling`), and `cfg` with `model.lora` as that LoRA sets it (`with_lora`)."""
    second = second or check_sampling(cfg)
    if weights is None:
        adapter = build_adapter(cfg, device)
    else:
        lora = lora or read_lora(weights)
        cfg = with_lora(cfg, lora, str(weights))
        adapter = build_adapter(cfg, device)
        load_lora(adapter, lora, weights)
    prepare_sampling(adapter, cfg, second)
    return cfg, adapter


def check_sampling(cfg: Config, steps: int | None = None) -> LoraWeights | None:
    """What `inference` asks of the model, checked on its shape (built on the meta device) before a model is built
    or anything written: the cache hook's options (`block_cache.cache_config`, for `steps` sampler steps) and the
    second LoRA, which is read and returned (None without one)."""
    settings = cfg.inference
    if settings.cache == "none" and settings.second_lora is None:
        return None
    transformer = build_transformer_on_meta(cfg.model)
    if settings.cache != "none":
        cache_config(transformer, settings, steps or settings.steps)
    if settings.second_lora is None:
        return None
    source = f"inference.second_lora={settings.second_lora}"
    try:
        second = read_lora(Path(settings.second_lora))
    except WeightsError as e:
        raise WeightsError(f"inference.second_lora: {e}") from None
    check_lora_fits(transformer, cfg.model, second, source)
    return second


def check_steps(settings: InferenceConfig, steps: int, where: str) -> None:
    """Refuse a step count whose UniPC schedule repeats a timestep, before a model is built: diffusers' UniPC
    rounds its timesteps to integers, under a flow shift the first ones crowd below 1000 (at shift 3 from 334
    steps), and it stops on a repeated one with an AssertionError mid-sampling. Euler's timesteps stay apart."""
    if settings.scheduler != "unipc":
        return
    scheduler = build_scheduler(settings.scheduler, settings.shift)

    def apart(n: int) -> bool:
        scheduler.set_timesteps(n)
        return len(set(scheduler.timesteps.tolist())) == n

    if apart(steps):
        return
    most = next(n for n in range(1, steps + 1) if not apart(n)) - 1
    raise ConfigError(
        f"{where}: {steps} steps of the unipc sampler at inference.shift={settings.shift} repeat a timestep "
        f"(it takes at most {most}); take fewer steps or inference.scheduler=euler"
    )


def prepare_sampling(adapter: WanAdapter, cfg: Config, second: LoraWeights | None = None) -> None:
    """Stack `second` (read from `inference.second_lora`) on the adapter's LoRA, scale both as `inference` sets them,
    and with `inference.merge_lora` fold them into the base weights (the second's bias and full-weight deltas are
    added to the base weights either way)."""
    settings = cfg.inference
    scales = {OWN_ADAPTER: settings.lora_weight}
    if second is not None:
        stack_lora(adapter.transformer, cfg.model, second, f"inference.second_lora={settings.second_lora}")
        add_weight_deltas(adapter.transformer, second, settings.second_lora_weight)
        scales[SECOND_ADAPTER] = settings.second_lora_weight
    set_lora_scales(adapter.transformer, scales)
    if settings.merge_lora:
        # diffusers' fuse_lora: W += scale·B·A·alpha/rank for every active adapter, so a forward runs no LoRA branch.
        # The LoRA weights stay (lora_state_dict still returns them), but loading others would not change the fused
        # weights: for a model that only samples, as here.
        adapter.transformer.fuse_lora()


def with_lora(cfg: Config, lora: LoraWeights, source: str) -> Config:
    """`cfg` with the `model.lora` that holds `lora` (rank, alpha and targets from the file; see `lora_config_for`)."""
    model = dataclasses.replace(cfg.model, lora=lora_config_for(cfg.model, lora, source))
    return dataclasses.replace(cfg, model=model)


def load_lora(adapter: WanAdapter, lora: LoraWeights, source: Path | str) -> None:
    """Load `lora` into `adapter`, built with `with_lora`'s config (strict: the same modules and shapes)."""
    try:
        adapter.load_lora_state_dict(lora.state)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None


def require_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse LoRA weights holding NaN or infinity: applied, they would turn every output into NaN, silently."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{source}: LoRA weight {key!r} holds NaN or infinite values (a diverged run?)")


def read_lora(weights: Path) -> LoraWeights:
    """The LoRA of a file or folder that `--lora` accepts, or of a DreamShot checkpoint (Lightning `.ckpt` or
    DeepSpeed folder, or its backup when a save was killed between its renames: alpha from the config it was
    trained with). Weights holding NaN or infinity are refused."""
    lora = _read_any(weights)
    require_finite({**lora.state, **{key: delta.tensor for key, delta in lora.deltas.items()}}, weights)
    return lora


def _read_any(weights: Path) -> LoraWeights:
    weights = intact_checkpoint(weights)
    if not weights.exists():
        raise WeightsError(f"{weights}: LoRA file not found")
    if weights.is_dir() and not any((weights / name).is_file() for name in (PEFT_CONFIG, DIFFUSERS_WEIGHTS)):
        return _read_deepspeed(weights)
    if weights.suffix == ".ckpt" and weights.is_file():
        return _read_checkpoint(weights)
    return read_lora_file(weights)


def _read_deepspeed(folder: Path) -> LoraWeights:
    states = next((folder / name for name in DEEPSPEED_MODEL_STATES if (folder / name).is_file()), None)
    if states is None:
        raise WeightsError(
            f"{folder}: not a DeepSpeed checkpoint folder (no {' or '.join(DEEPSPEED_MODEL_STATES)}), nor a peft "
            f"adapter ({PEFT_CONFIG}) or diffusers LoRA folder ({DIFFUSERS_WEIGHTS})"
        )
    try:
        checkpoint = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise WeightsError(f"{states}: not a readable DeepSpeed checkpoint ({type(e).__name__})") from None
    if CHECKPOINT_LORA_KEY not in checkpoint:
        raise WeightsError(f"{states}: holds no gathered LoRA ({CHECKPOINT_LORA_KEY!r}); was it written by DreamShot?")
    return _checkpoint_lora(checkpoint[CHECKPOINT_LORA_KEY], checkpoint)


def _read_checkpoint(path: Path) -> LoraWeights:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise WeightsError(f"{path}: not a readable DreamShot checkpoint ({type(e).__name__})") from None
    return _checkpoint_lora(_module_lora(state), checkpoint)


def _module_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft names) among `DreamShotModule` parameters."""
    return {
        key.removeprefix(CHECKPOINT_PREFIX).replace(ADAPTER_NAME, "."): value
        for key, value in state.items()
        if key.startswith(CHECKPOINT_PREFIX)
    }


def _checkpoint_lora(state: dict[str, torch.Tensor], checkpoint: dict) -> LoraWeights:
    """A checkpoint's LoRA with the alpha and base model of the config saved in it (`DreamShotModule`'s
    hyper-parameters), when there is one. A run with `optim.ema_decay` writes the average of its weights as its
    LoRA files: its checkpoints read as that average too (kept by `LoraEma`), so an export of `last.ckpt` is the
    run's `lora.safetensors`."""
    average = checkpoint.get("callbacks", {}).get(EMA_STATE_KEY, {}).get("average")
    if average:
        state = _module_lora(average)
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if config is None:
        return LoraWeights(state, None)
    try:
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml.safe_load(config)["model"]))
    except (OmegaConfBaseException, yaml.YAMLError, KeyError, TypeError):  # a config of an older schema
        return LoraWeights(state, None)
    return LoraWeights(state, model.lora.alpha, base_model_record(model))
