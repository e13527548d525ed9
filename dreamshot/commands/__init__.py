"""The `dreamshot` subcommands, one module each (`add_arguments(parser)`, `run(args)`; `dreamshot.cli`), and the
command-line arguments several of them share."""

from __future__ import annotations

import argparse

from dreamshot.config.load import available_experiments

OVERRIDES_HELP = (
    "config overrides, anywhere on the line: key.sub=value, list.0.key=value (curriculum.0.steps=15), "
    "or group=option (model=wan14b)"
)


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """EXPERIMENT (a name in experiments/ or a yaml path), then the config overrides."""
    parser.add_argument(
        "experiment", help=f"a name in experiments/ ({', '.join(available_experiments())}) or a yaml path"
    )
    add_override_arguments(parser)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The config overrides: `key=value` words anywhere on the line (`dreamshot.cli.parse_with_overrides`)."""
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
