"""A trained DreamShot model for inference: the run's config, the backbone, and its LoRA weights.

Weights come from a run folder (`lora.safetensors`, else `checkpoints/last.ckpt`), a LoRA file (safetensors
written by `ExportLora`, or a Lightning `.ckpt` of this project), or nothing (the bare backbone). The config
is the one the weights were trained with: `--config` when given, else the run's `config.yaml`, found beside
the LoRA file or one folder up (`<run>/checkpoints/x.ckpt`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.config.schema import Config
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY, LORA_FILE
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


def add_weight_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """`--run | --lora | --base` (one required) and `--config`; returns the group so a command can add sources."""
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--run", type=Path, help="training run folder (config.yaml + lora.safetensors or last.ckpt)")
    weights.add_argument("--lora", type=Path, help="LoRA weights: exported .safetensors or a .ckpt checkpoint")
    weights.add_argument("--base", action="store_true", help="no LoRA: the bare backbone")
    parser.add_argument("--config", help="experiment name or yaml to build the model (default: the run's config.yaml)")
    return weights


def run_weights(run_dir: Path) -> Path:
    """The LoRA file of a run folder: the exported safetensors, else the last checkpoint."""
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {RUN_CONFIG})")
    for candidate in (run_dir / LORA_FILE, run_dir / LAST_CHECKPOINT):
        if candidate.is_file():
            return candidate
    raise WeightsError(f"{run_dir}: neither {LORA_FILE} nor {LAST_CHECKPOINT} found (has the run trained?)")


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
    LoRA weights trained on it apply to the same frozen weights here.
    """
    return WanAdapter.seeded(cfg.model, cfg.seed).to(device).eval()


def load_lora(adapter: WanAdapter, path: Path) -> None:
    """Load LoRA weights from a `.safetensors` LoRA file or a DreamShot `.ckpt` into `adapter` (strict)."""
    if not path.exists():
        raise WeightsError(f"{path}: LoRA file not found")
    state = read_lora(path)
    require_finite(state, path)
    try:
        adapter.load_lora_state_dict(state)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None


def require_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse LoRA weights holding NaN or infinity: applied, they would turn every output into NaN, silently."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{source}: LoRA weight {key!r} holds NaN or infinite values (a diverged run?)")


def read_lora(weights: Path) -> dict[str, torch.Tensor]:
    """LoRA weights under peft names from a DreamShot LoRA file, Lightning checkpoint or DeepSpeed folder."""
    if weights.is_dir():
        return _read_deepspeed(weights)
    return _read_checkpoint(weights) if weights.suffix == ".ckpt" else _read_safetensors(weights)


def _read_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    states = next((folder / name for name in DEEPSPEED_MODEL_STATES if (folder / name).is_file()), None)
    if states is None:
        raise WeightsError(f"{folder}: not a DeepSpeed checkpoint folder (no {' or '.join(DEEPSPEED_MODEL_STATES)})")
    try:
        checkpoint = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise WeightsError(f"{states}: not a readable DeepSpeed checkpoint ({type(e).__name__})") from None
    if CHECKPOINT_LORA_KEY not in checkpoint:
        raise WeightsError(f"{states}: holds no gathered LoRA ({CHECKPOINT_LORA_KEY!r}); was it written by DreamShot?")
    return checkpoint[CHECKPOINT_LORA_KEY]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise WeightsError(f"{path}: not a readable DreamShot checkpoint ({type(e).__name__})") from None
    return {
        key.removeprefix(CHECKPOINT_PREFIX).replace(ADAPTER_NAME, "."): value
        for key, value in state.items()
        if key.startswith(CHECKPOINT_PREFIX)
    }
