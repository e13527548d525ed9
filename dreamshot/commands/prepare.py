"""`dreamshot prepare`: turn a folder of videos into storyboard groups (the paper's appendix A pipeline)."""

from __future__ import annotations

import argparse

from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.pipeline import prepare
from dreamshot.prepare.report import format_table
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", help="folder of videos (searched recursively: .mp4, .mkv, .mov, ...)")
    parser.add_argument(
        "overrides", nargs="*", help="settings, anywhere on the line: key.sub=value (shots.threshold=20)"
    )
    parser.add_argument("--out", required=True, help="output folder: manifest.jsonl, images, masks, state, report")
    parser.add_argument("--config", help="yaml file over the defaults of dreamshot.prepare.config.PrepareConfig")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    cfg = load_prepare_config(args.config, args.overrides)
    check_output_dir(args.out, "--out")
    summary = prepare(args.videos, args.out, cfg, progress=not args.no_progress)
    print(format_table(summary.counts))
    print(f"{summary.manifest}: {summary.groups} groups, {summary.shots} shots")
    if summary.removed:
        print(f"deleted {summary.removed} images of earlier runs with other settings")
