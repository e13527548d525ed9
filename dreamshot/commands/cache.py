"""`dreamshot cache EXPERIMENT [key=value ...]`: precompute the VAE latents and umT5 embeddings of an
experiment's data into `data.cache_dir` (DESIGN §4), at every curriculum phase's resolution.

Training with the same config then reads them instead of running the VAE and umT5. An interrupted run resumes:
storyboards already in a complete shard are not encoded again.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from dreamshot.commands import add_experiment_arguments
from dreamshot.config.load import load_config, load_runs
from dreamshot.config.schema import Config
from dreamshot.data.cache import CachedRecord, cache_bytes, cache_fingerprint, encode_record, write_cache
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.data.dataset import Resolution
from dreamshot.data.manifest import StoryboardRecord, load_manifest
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.planner.plan import shot_window
from dreamshot.utils.devices import pick_device
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--member", help="cache only for this member of a sweep experiment")
    parser.add_argument("--device", help="where the VAE and umT5 run (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    if args.member:
        runs = [load_config(args.experiment, args.overrides, args.member, require_inputs=True)]
    else:
        runs = load_runs(args.experiment, args.overrides, require_inputs=True)
    device = pick_device(args.device, "--device")
    for cfg in runs:
        encoded = build_cache(cfg, device, progress=not args.no_progress)
        root = Path(cfg.data.cache_dir)
        size = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
        sizes = ", ".join(sorted(path.name for path in root.iterdir() if path.is_dir()))
        print(f"{cfg.name}: latent cache {root} ({sizes}; {size / 2**20:.1f} MiB), {encoded} storyboards encoded now")


def build_cache(cfg: Config, device: str | torch.device = "cpu", progress: bool = True) -> int:
    """Cache every group of the run's manifest at every phase's resolution in `data.cache_dir`; returns how
    many (group, resolution) pairs were encoded (0 when the cache was already complete)."""
    if cfg.data.cache_dir is None:
        raise ConfigError(
            "data.cache_dir is not set: give the cache folder in the experiment or as data.cache_dir=PATH"
        )
    datamodule = StoryboardDataModule(
        cfg.data, cfg.output_dir, cfg.seed, cfg.curriculum, shot_window=functools.partial(shot_window, cfg)
    )
    manifest = datamodule.manifest_path()
    # Every group, whatever the split and source filter: runs that differ only there share one cache.
    records = load_manifest(manifest, check_files=True)
    entries = datamodule.cache_entries(records)
    max_shots = datamodule.window(records)
    need = cache_bytes(entries, cfg.model, max_shots)
    check_output_dir(cfg.data.cache_dir, "data.cache_dir", need, "the latents of every storyboard")
    return write_cache(
        cfg.data.cache_dir,
        cache_fingerprint(cfg.model, cfg.seed, max_shots, manifest),
        manifest,
        entries,
        functools.partial(_encoder, cfg, device, max_shots),
        cfg.data.cache_shard_size,
        progress,
    )


def _encoder(
    cfg: Config, device: str | torch.device, max_shots: int
) -> Callable[[StoryboardRecord, Resolution], CachedRecord]:
    """The encoder of the adapter a training run of `cfg` builds (same seed, so a random backbone has the same
    VAE and umT5), with only its VAE and umT5 moved to `device`."""
    adapter = WanAdapter.seeded(cfg.model, cfg.seed).eval()
    adapter.vae.to(device)
    adapter.text_encoder.to(device)
    return functools.partial(encode_record, adapter, max_shots=max_shots)
