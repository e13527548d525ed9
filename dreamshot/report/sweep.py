"""Run an experiment's runs one after another on this machine, or print their launch lines for a cluster.

`python -m dreamshot.report.sweep EXPERIMENT [key=value ...] [--member M] [--run DIR] [--eval BENCH]
[--print-commands]` (`make sweep SWEEP=...`). Every run is one `dreamshot` command line:

- a training experiment (a sweep or a single run): `dreamshot train EXPERIMENT ... trainer.ckpt_path=last
  --member M` per member, each a W&B run in the experiment's group (`dreamshot.config.load`); with `--eval BENCH`
  every member's run folder is then scored: `dreamshot eval BENCH --run <run> --out <run>/eval/<bench>-<mode>`.
  Run again, the sweep continues where it stopped (`dreamshot.commands.train.RESUME`; the evaluations draw only
  what they miss).
- an evaluation-time experiment (tagged `eval_time`: its members override only `inference.*` / `eval.*`, e.g.
  the ω1 / ω2 guidance grid) trains nothing: each member scores the trained run `--run DIR` with
  `dreamshot eval`, its evaluation settings passed as overrides, into the member's `output_dir`, named, tagged
  and grouped like a training member. A DIR that is not a trained run folder is refused before a line is run or
  printed.

`dreamshot report EXPERIMENT` then compares the runs in `outputs/<experiment>/`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from dreamshot.cli import OneLineParser, parse_with_overrides, run_reporting
from dreamshot.commands import add_experiment_arguments
from dreamshot.commands.train import train_command
from dreamshot.config.load import EVAL_TIME_TAG, compose, is_eval_time, load_config, sweep_members
from dreamshot.config.schema import EVAL_BENCHMARKS, Config
from dreamshot.inference.loading import run_weights
from dreamshot.report.runs import EVAL_DIR, flatten
from dreamshot.utils.errors import ConfigError, DreamShotError

# Config sections an evaluation-time run may change: everything else is the trained run's.
EVAL_TIME_SECTIONS = ("inference", "eval")
_EVAL_TIME_PREFIXES = tuple(f"{section}." for section in EVAL_TIME_SECTIONS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--member", help="only this member of the sweep")
    parser.add_argument("--run", type=Path, help="trained run folder an evaluation-time experiment scores")
    parser.add_argument("--eval", choices=EVAL_BENCHMARKS, help="after training, score every run on this benchmark")
    parser.add_argument("--print-commands", action="store_true", help="print the launch lines instead of running")


def run(args: argparse.Namespace) -> int:
    """Run (or print) every command of the sweep; stops at the first that fails and returns its exit status."""
    commands = sweep_commands(args.experiment, args.overrides, args.member, args.run, args.eval)
    if args.print_commands:
        for argv in commands:
            print(shlex.join(["dreamshot", *argv]))
        return 0
    from dreamshot.cli import main  # imported here: the CLI imports every command module

    for argv in commands:
        print(f"\n$ {shlex.join(['dreamshot', *argv])}", flush=True)
        status = main(argv)
        if status:
            return status
    return 0


def sweep_commands(
    experiment: str,
    overrides: list[str] | None = None,
    member: str | None = None,
    run_dir: Path | None = None,
    benchmark: str | None = None,
) -> list[list[str]]:
    """The `dreamshot` argument lists of the experiment's runs, in member order (every config is checked first)."""
    overrides = list(overrides or [])
    members = sweep_members(experiment)
    if member is not None and member not in members:
        raise ConfigError(f"experiment {experiment!r} has no sweep member {member!r}")
    names = [member] if member else list(members) or [None]
    # The first member says whether the experiment trains; an evaluation-time one needs no data or weights, a
    # training run must have both: refused here, not on the cluster.
    composed = compose(experiment, overrides, names[0])
    trains = not is_eval_time(composed.config)
    if trains:
        composed.require_inputs()
    rest = (load_config(experiment, overrides, name, require_inputs=trains) for name in names[1:])
    configs = [composed.config, *rest]
    if not trains:
        if run_dir is None:
            raise ConfigError(f"{experiment} is an {EVAL_TIME_TAG} experiment: pass the trained run to score (--run)")
        check_trained_run(run_dir)
        base = eval_time_values(load_config())
        return [
            eval_member_command(cfg, [*members.get(name, []), *overrides], run_dir, name, base)
            for cfg, name in zip(configs, names, strict=True)
        ]
    commands = []
    for cfg, name in zip(configs, names, strict=True):
        commands.append(train_command(experiment, overrides, name))
        if benchmark:
            out = Path(cfg.output_dir)
            folder = out / EVAL_DIR / f"{benchmark}-{cfg.eval.mode}"
            # --redraw: the folder belongs to the run just trained; shots of an earlier training are stale.
            where = ["--run", str(out), "--out", str(folder), "--label", name or cfg.name, "--redraw"]
            commands.append(["eval", benchmark, *where])
    return commands


def check_trained_run(run_dir: Path) -> None:
    """Refuse (one line naming --run) a folder `dreamshot eval --run` would refuse: not a run folder, or one with no
    weights yet (`run_weights`), so that printed launch lines never score a run that is not there."""
    try:
        run_weights(run_dir)
    except DreamShotError as e:
        raise type(e)(f"--run {e}") from None


def eval_member_command(
    cfg: Config, overrides: list[str], run_dir: Path, name: str | None, base: dict[str, Any]
) -> list[str]:
    """`dreamshot eval` of the trained run `run_dir` under one member's evaluation settings.

    `overrides` are the member's and the command line's; they may touch only `inference.*` / `eval.*`. The
    settings passed on are the keys they name and every other `inference.*` / `eval.*` value that differs from
    `base` (`eval_time_values` of the base config, no experiment); the rest of the config is the trained run's.
    """
    outside = [item for item in overrides if not item.startswith(_EVAL_TIME_PREFIXES)]
    if outside:
        raise ConfigError(
            f"{cfg.name}: an {EVAL_TIME_TAG} run scores a trained run, so only inference.* and eval.* can be "
            f"overridden, not {outside[0]!r}"
        )
    values = eval_time_values(cfg)
    named = [item.split("=", 1)[0] for item in overrides]
    keys = [k for k in values if base.get(k) != values[k] or any(k == n or k.startswith(f"{n}.") for n in named)]
    settings = [f"{key}={_dotlist_value(values[key])}" for key in keys]
    identity = [f"name={cfg.name}", f"logger.group={cfg.logger.group or cfg.name}", f"tags={_dotlist_value(cfg.tags)}"]
    # --redraw: the member's folder follows the run it scores (retrained, its shots are stale).
    where = ["--run", str(run_dir), "--out", cfg.output_dir, "--label", name or cfg.name, "--redraw"]
    return ["eval", cfg.eval.benchmark, *settings, *identity, *where]


def eval_time_values(cfg: Config) -> dict[str, Any]:
    """The dotted `inference.*` / `eval.*` values of `cfg`."""
    return flatten({section: asdict(getattr(cfg, section)) for section in EVAL_TIME_SECTIONS})


def _dotlist_value(value: Any) -> str:
    """A value as the config loader reads a `key=value` override (yaml, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


def main(argv: list[str] | None = None) -> int:
    """The command line: a usage error, a `DreamShotError` or Ctrl-C is one line on stderr led by the program's
    name, as in `dreamshot` (a member's own command prints its errors as `dreamshot` does)."""
    parser = OneLineParser(prog="python -m dreamshot.report.sweep", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    return run_reporting(parser.prog, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
