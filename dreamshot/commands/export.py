"""`dreamshot export RUN_DIR|CKPT|LORA.safetensors --out DIR [--format diffusers,comfyui,peft]`: a trained LoRA
in the formats other tools load (see `models/wan/lora_formats.py`), one safetensors file per format.

The source is a run folder (its `lora.safetensors`, else its last checkpoint), a Lightning checkpoint file, a
DeepSpeed checkpoint folder (ZeRO-2 or ZeRO-3: the gathered LoRA that ExportLora keeps in it, no conversion
step), or a LoRA in any format `--lora` reads (DreamShot's, diffusers', a peft folder, ComfyUI, musubi-tuner).
Rank, alpha and modules come from the source (`inference/loading.py`); the base model from the run's config
(`config.yaml` beside the source or one folder up, or `--config`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamshot.inference.loading import RUN_CONFIG, read_lora, resolve_config, run_weights, with_lora
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora import check_lora_fits
from dreamshot.models.wan.lora_formats import FORMATS
from dreamshot.training.callbacks import write_lora_files
from dreamshot.utils.errors import ConfigError, WeightsError
from dreamshot.utils.io import check_output_dir

# Where a DeepSpeed checkpoint folder written by Lightning (tag "checkpoint") keeps rank 0's module state:
# ZeRO-2 writes one file, ZeRO-3 one per rank.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a run folder, a checkpoint (.ckpt file or DeepSpeed folder) or a LoRA file or peft folder"
    )
    parser.add_argument("--out", required=True, help="folder for the exported files")
    parser.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated formats among {', '.join(FORMATS)} (default: all)",
    )
    parser.add_argument("--config", help="the run's experiment or yaml (default: the config.yaml of the run)")


def run(args: argparse.Namespace) -> None:
    formats = parse_formats(args.format)
    weights = source_weights(Path(args.source))
    lora = read_lora(weights)
    cfg = with_lora(resolve_config(weights, args.config, []), lora, str(weights))
    # Every file records the config's base model: a LoRA of another size must not be written as one of it.
    check_lora_fits(build_transformer_on_meta(cfg.model), cfg.model, lora, str(weights))
    need = len(formats) * sum(4 * t.numel() for t in lora.state.values()) + 2**20
    check_output_dir(args.out, "--out", need, "the LoRA files")
    metadata = {"source": str(weights)}
    for path in write_lora_files(lora.state, Path(args.out), cfg.model, metadata, formats):
        print(path)


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format: {text!r} must list formats among {', '.join(FORMATS)}")
    return formats


def source_weights(source: Path) -> Path:
    """The weights file or DeepSpeed folder of `source` (a run folder stands for its LoRA or last checkpoint)."""
    if not source.exists():
        raise WeightsError(f"{source}: not found")
    if source.is_dir() and (source / RUN_CONFIG).is_file():
        return run_weights(source)
    return source
