"""`dreamshot train EXPERIMENT [key=value ...]`: one run, or every member of a sweep one after another."""

from __future__ import annotations

import argparse
import json
import shlex

from dreamshot.config.load import available_experiments, load_config, load_runs, sweep_members
from dreamshot.config.schema import Config
from dreamshot.training.callbacks import SUMMARY_FILE
from dreamshot.training.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiment", help=f"a name in experiments/ ({', '.join(available_experiments())}) or a yaml path"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: key.sub=value, or group=option (model=wan14b)")
    parser.add_argument("--member", help="train only this member of a sweep experiment")
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="print one launch line per run (for a cluster scheduler) instead of training here",
    )


def run(args: argparse.Namespace) -> None:
    if args.print_commands:
        for line in launch_lines(args.experiment, args.overrides):
            print(line)
        return
    if args.member:
        runs = [load_config(args.experiment, args.overrides, args.member)]
    else:
        runs = load_runs(args.experiment, args.overrides)
    for cfg in runs:
        report(cfg, train(cfg))


def launch_lines(experiment: str, overrides: list[str]) -> list[str]:
    """`dreamshot train` command lines, one per run of the experiment."""
    load_runs(experiment, overrides)  # fail here, not on the cluster
    base = ["dreamshot", "train", experiment, *overrides]
    members = sweep_members(experiment)
    return [shlex.join([*base, "--member", m]) for m in members] or [shlex.join(base)]


def report(cfg: Config, out) -> None:
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print(f"\n{cfg.name}: {summary['steps']} steps")
    if "loss_start" in summary:
        window = summary["loss_window"]
        print(
            f"  train loss      {summary['loss_start']:.4f} (mean of the first {window} steps)"
            f" -> {summary['loss_end']:.4f} (last {window})"
        )
    for key in ("lora", "checkpoint_dir", "logs"):
        print(f"  {key:<16}{summary[key]}")
