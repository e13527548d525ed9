"""`dreamshot train EXPERIMENT [key=value ...]`."""

from __future__ import annotations

import argparse
import json

from dreamshot.config.load import available_experiments, load_config
from dreamshot.training.callbacks import SUMMARY_FILE
from dreamshot.training.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiment", help=f"a name in experiments/ ({', '.join(available_experiments())}) or a yaml path"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides: key.sub=value, or group=option (model=wan14b)"
    )


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.experiment, args.overrides)
    out = train(cfg)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print(f"\n{cfg.name}: {summary['steps']} steps")
    if "loss_start" in summary:
        print(
            f"  train loss  {summary['loss_start']:.4f} (first {summary['loss_window']} steps)"
            f" -> {summary['loss_end']:.4f} (last {summary['loss_window']})"
        )
    for key in ("lora", "checkpoint_dir", "logs"):
        print(f"  {key:<14}{summary[key]}")
