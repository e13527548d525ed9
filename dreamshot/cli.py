"""`dreamshot` command line: one subcommand per module in `dreamshot.commands`.

A `DreamShotError` (bad config, data or weights) is printed as one line on stderr with exit status 2, and
Ctrl-C as one line with status 130 (what was kept, and how to continue; `train` stops at a SIGTERM the same way,
status 143); so is a usage error, named with its subcommand. A reader that closes the output early (`| head`) ends
the command quietly with status 141, as SIGPIPE ends a shell tool. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Callable

from dreamshot.utils.errors import DreamShotError, Interrupted

# 128 + SIGPIPE: the status of a shell tool whose reader went away (`dreamshot ... | head`).
CLOSED_OUTPUT_STATUS = 141

# Subcommand name -> module under dreamshot.commands exposing `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "toyworld": "Write the procedural toy storyboard set as a JSONL manifest with images and masks.",
    "cache": "Precompute an experiment's VAE latents and umT5 embeddings into data.cache_dir (resumable).",
    "train": "Train an experiment (LoRA on the Wan DiT).",
    "export": "Write a trained LoRA for diffusers (WanPipeline) and ComfyUI, from a run, checkpoint or LoRA file.",
    "plan": "Parameters, tokens, FLOPs and per-GPU memory of an experiment's training step, or with --eval the "
    "GPU-hours of drawing a benchmark (analytic).",
    "generate": "Draw a storyboard from a story file (t2s / r2s / s2s), or re-roll some of its shots.",
    "animate": "Turn a generated storyboard into a video, one Wan image-to-video clip per shot.",
    "prepare": "Turn a folder of videos into storyboard groups (shots, keyframes, filters, grouping, roles).",
    "eval": "Score a benchmark (CIDS, CSD, AES, Alignment): draw its storyboards or read a folder of outputs.",
    "report": "Compare a group's runs: metric table (markdown, CSV) and plots like the paper's figures.",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its help line; only `command`'s module is imported, to add its arguments, so a
    command loads its own dependencies alone (`dreamshot plan` needs no PyAV, `dreamshot toyworld` no DeepSpeed)."""
    parser = OneLineParser(prog="dreamshot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module(name).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The top-level parser takes no option but --help: the first other word names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = parse_with_overrides(build_parser(command), argv)
    return run_reporting(f"dreamshot {args.command}", lambda: _module(args.command).run(args))


def run_reporting(prog: str, command: Callable[[], int | None]) -> int:
    """Run `command`, returning its exit status (None: 0); a `DreamShotError` or Ctrl-C is one line on stderr led
    by `prog`, as `OneLineParser` leads a usage error, and its exit status is returned. A closed stdout ends it
    quietly (`CLOSED_OUTPUT_STATUS`)."""
    try:
        status = command() or 0
        sys.stdout.flush()  # here, not at exit: a reader gone by then is seen below, not as a shutdown traceback
        return status
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe or socket (a judge endpoint): a bug or a fault to see, not the reader leaving
        # What is still buffered cannot reach anyone: stdout goes to /dev/null so the exit flush stays silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_OUTPUT_STATUS
    except DreamShotError as e:
        label = "" if isinstance(e, Interrupted) else "error: "
        print(f"{prog}: {label}{e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        # Every writer is atomic: what a command finished is kept, and the same command continues from it.
        print(f"{prog}: interrupted; finished work is kept, rerun to continue", file=sys.stderr)
        return Interrupted.exit_status


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone (poll reports an error on a pipe whose read end is closed)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`, taking `key=value` words anywhere on the line as config overrides, in the order given
    (argparse alone takes a positional list only before the first option)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    unknown = [word for word in extra if word not in overrides]
    if overrides and not hasattr(args, "overrides"):
        unknown = extra
    if unknown:
        if getattr(args, "command", None):
            # The subcommand's parser left them over: its name leads the line, as in its own errors.
            parser.prog = f"{parser.prog} {args.command}"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # exits with status 2
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _module(name: str):
    return importlib.import_module(f"dreamshot.commands.{name}")


if __name__ == "__main__":
    sys.exit(main())
