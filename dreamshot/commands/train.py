"""`dreamshot train EXPERIMENT [key=value ...]`: one run, or every member of a sweep one after another.

Every run's config is composed and checked before torch, diffusers or Lightning is imported, so a typo or a
missing input costs a second, not the imports.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from dreamshot.commands import add_experiment_arguments
from dreamshot.config.load import (
    EVAL_TIME_TAG,
    describe_curriculum,
    is_eval_time,
    load_config,
    load_runs,
    sweep_members,
)
from dreamshot.config.schema import Config
from dreamshot.utils.errors import ConfigError

# Every launch line resumes, so the same line serves a requeued (preempted) cluster job and a sweep run again after
# a failed or killed member: a finished run restores its last step and trains no further, a killed one continues
# from its checkpoint, one not started yet starts (`trainer.ckpt_path=last` is a fresh run in a folder without a
# checkpoint). Without it a relaunch is refused: its folder holds another run (`run_folder.check_fresh_start`).
# Left out when the command line says how to start itself.
RESUME = "trainer.ckpt_path=last"
_START_KEYS = ("trainer.ckpt_path", "trainer.overwrite")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--member", help="train only this member of a sweep experiment")
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="print one launch line per run (for a cluster scheduler) instead of training here",
    )


def run(args: argparse.Namespace) -> None:
    runs = training_runs(args.experiment, args.overrides, args.member)
    if args.print_commands:
        for line in launch_lines(args.experiment, args.overrides, args.member):
            print(line)
        return
    from dreamshot.training.train import train  # imported once every config is known to be good

    for cfg in runs:
        print(f"{cfg.name}: {describe_curriculum(cfg)}", flush=True)
        report(cfg, train(cfg))


def training_runs(experiment: str, overrides: list[str], member: str | None = None) -> list[Config]:
    """The configs to train, with their data and weights required; an evaluation-time experiment is refused."""

    def load(require_inputs: bool) -> list[Config]:
        if member:
            return [load_config(experiment, overrides, member, require_inputs)]
        return load_runs(experiment, overrides, require_inputs)

    # Looked at first: an evaluation-time experiment may leave the training data unset, and that is not its fault.
    if is_eval_time(load(require_inputs=False)[0]):
        name = Path(experiment).stem
        raise ConfigError(
            f"{name} is an evaluation-time experiment (tag {EVAL_TIME_TAG}): training its members would give "
            f"identical LoRAs; score a trained run with `make sweep SWEEP={name} CKPT=<run folder>`"
        )
    return load(require_inputs=True)


def launch_lines(experiment: str, overrides: list[str], member: str | None = None) -> list[str]:
    """`dreamshot train` command lines, one per run of the experiment (or of `member`)."""
    members = [member] if member else list(sweep_members(experiment)) or [None]
    return [shlex.join(["dreamshot", *train_command(experiment, overrides, m)]) for m in members]


def train_command(experiment: str, overrides: list[str], member: str | None = None) -> list[str]:
    """The `dreamshot train` argument list of one run (`member` of a sweep, or the experiment), resuming (`RESUME`)."""
    resume = [] if any(item.split("=", 1)[0] in _START_KEYS for item in overrides) else [RESUME]
    return ["train", experiment, *overrides, *resume, *(["--member", member] if member else [])]


def report(cfg: Config, out: Path) -> None:
    from dreamshot.training.callbacks import SUMMARY_FILE  # training has imported it already

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
