"""`dreamshot export RUN_DIR|CKPT|LORA.safetensors --out DIR [--format diffusers,comfyui,peft]`: a trained LoRA
in the formats other tools load (see `models/wan/lora_formats.py`), one safetensors file per format.

The source is a run folder (its `lora.safetensors`, else its last checkpoint), a Lightning checkpoint file, a
DeepSpeed checkpoint folder (ZeRO-2 or ZeRO-3: the gathered LoRA that ExportLora keeps in it, no conversion
step), or a LoRA file written by DreamShot. alpha comes from the run's config (`config.yaml` beside the source
or one folder up, or `--config`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamshot.inference.loading import RUN_CONFIG, read_lora, require_finite, resolve_config, run_weights
from dreamshot.models.wan.lora_formats import FORMATS
from dreamshot.training.callbacks import write_lora_files
from dreamshot.utils.errors import ConfigError, WeightsError
from dreamshot.utils.io import check_output_dir

# Where a DeepSpeed checkpoint folder written by Lightning (tag "checkpoint") keeps rank 0's module state:
# ZeRO-2 writes one file, ZeRO-3 one per rank.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a run folder, a checkpoint (.ckpt file or DeepSpeed folder) or a DreamShot LoRA .safetensors"
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
    cfg = resolve_config(weights, args.config, [])
    state = read_lora(weights)
    require_finite(state, weights)
    need = len(formats) * sum(4 * t.numel() for t in state.values()) + 2**20
    check_output_dir(args.out, "--out", need, "the LoRA files")
    metadata = {"source": str(weights)}
    for path in write_lora_files(state, Path(args.out), cfg.model.lora.alpha, metadata, formats):
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
