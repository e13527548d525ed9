"""`dreamshot export RUN_DIR|CKPT|LORA.safetensors --out DIR [--format diffusers,comfyui,peft] [--overwrite]`:
a trained LoRA in the formats other tools load (see `models/wan/lora_formats.py`), one safetensors file per format.

The source is a run folder (its `lora.safetensors`, else its last checkpoint), a Lightning checkpoint file, a
DeepSpeed checkpoint folder (ZeRO-2 or ZeRO-3: the gathered LoRA that ExportLora keeps in it, no conversion
step), or a LoRA in any format `--lora` reads (DreamShot's, diffusers', a peft folder, ComfyUI, musubi-tuner).
A checkpoint of a run with `optim.ema_decay` exports the average of its weights, as the run's own LoRA files hold
it. Rank, alpha and modules come from the source (`inference/loading.py`); the base model from the run's config
(`config.yaml` beside the source or one folder up, or `--config`), which the LoRA's shapes must fit. Nothing is
written unless every file can be: a file already in `--out` is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamshot.inference.loading import RUN_CONFIG, read_lora, resolve_config, run_weights, with_lora
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora import check_lora_fits
from dreamshot.models.wan.lora_formats import FORMATS
from dreamshot.training.callbacks import EXPORT_FILES, write_lora_files
from dreamshot.training.strategy import intact_checkpoint
from dreamshot.utils.errors import ConfigError, DreamShotError, WeightsError
from dreamshot.utils.io import check_output_dir


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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace LoRA files already in --out (default: refuse, write nothing)"
    )


def run(args: argparse.Namespace) -> None:
    formats = parse_formats(args.format)
    weights = source_weights(Path(args.source))
    lora = read_lora(weights)
    cfg = with_lora(resolve_config(weights, args.config, []), lora, str(weights))
    # Every file records the config's base model: a LoRA of another size must not be written as one of it.
    check_lora_fits(build_transformer_on_meta(cfg.model), cfg.model, lora, str(weights))
    need = len(formats) * sum(4 * t.numel() for t in lora.state.values()) + 2**20
    check_output_dir(args.out, "--out", need, "the LoRA files")
    if not args.overwrite:
        check_no_export(Path(args.out), formats)
    metadata = {"source": str(weights)}
    for path in write_lora_files(lora.state, Path(args.out), cfg.model, metadata, formats):
        print(path)


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format: {text!r} must list formats among {', '.join(FORMATS)}")
    return formats


def check_no_export(out: Path, formats: list[str]) -> None:
    """Refuse to replace a LoRA file in `out` (a run folder's own files above all: its final LoRA would silently
    become the exported checkpoint's)."""
    existing = [out / EXPORT_FILES[name] for name in formats if (out / EXPORT_FILES[name]).exists()]
    if existing:
        raise DreamShotError(f"--out {out}: {existing[0].name} exists; pass --overwrite to replace it")


def source_weights(source: Path) -> Path:
    """The weights file or DeepSpeed folder of `source` (a run folder stands for its LoRA or last checkpoint; a
    DeepSpeed checkpoint whose save was killed between its renames, for its backup)."""
    source = intact_checkpoint(source)
    if not source.exists():
        raise WeightsError(f"{source}: not found")
    if source.is_dir() and (source / RUN_CONFIG).is_file():
        return run_weights(source)
    return source
