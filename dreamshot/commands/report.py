"""`dreamshot report GROUP [RUN_DIR ...] [--baseline RUN] [--root outputs] [--out DIR]`: compare a group's runs.

GROUP is an experiment name, whose runs are the folders in `<root>/<GROUP>/` (a sweep's members, or the evaluations
of an evaluation-time sweep), or a folder of run folders. Given RUN_DIRs, those runs are compared instead and GROUP
only names the report. Each run contributes its `results.json` values (`dreamshot eval`;
`<benchmark>-<mode>/<value>` when the runs' evaluations are not all of one benchmark and mode) and its last
validation metrics (val/loss, val/racl_in_mask, val/racl_confusion, from the CSV logs every run writes, W&B or not).
Runs that share a name (one experiment run with different settings) are named by the config values that differ; when
they differ in `seed`, each run's relative improvement is against the baseline setting's run of its own seed, and
each setting's runs are also summarised over the seeds (mean ± standard deviation, and paired by seed against the
baseline's setting). A sweep member without a folder, a run without any metric, a run whose training has not
finished (still training, stopped, or resumed since its summary.json: its steps are the ones its logs show), a run's
evaluation of other weights than its own (it trained on or started over since; left out), an evaluation whose
results.json does not name the drawing it scored (an older `dreamshot eval`: shown, marked), an evaluation value
whose runs' means are over different stories, and an evaluation-time sweep whose members scored other weights are
warnings on stderr and notes under the table; a RUN_DIR that is not a run folder, or is named twice, is refused.
Writes report.md, report.csv, report.json and plots/*.png into `<group folder>/report` (or --out), replacing that
folder whole (other files in it are kept: `dreamshot.report.build`), and logs the table and plots to W&B when the
runs' W&B mode (WANDB_MODE, else their logger.mode) is online.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dreamshot.config.load import available_experiments, sweep_members
from dreamshot.eval.report import RESULTS_JSON
from dreamshot.inference.loading import RUN_CONFIG
from dreamshot.report.build import write_report
from dreamshot.report.runs import RunRecord, find_runs, is_run, read_runs
from dreamshot.report.table import missing_data
from dreamshot.report.wandb_log import log_report, wandb_setting
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.io import check_output_dir

REPORT_DIR = "report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group", help="experiment name (runs in <root>/<group>/) or a folder of run folders")
    parser.add_argument("runs", nargs="*", type=Path, help="compare these run folders instead (GROUP names the report)")
    parser.add_argument("--root", type=Path, default=Path("outputs"), help="where runs are written (default: outputs)")
    parser.add_argument(
        "--baseline",
        help="run (or member, run with several seeds) to measure relative improvement against (default: the sweep's "
        "first member, else the first run)",
    )
    parser.add_argument("--out", type=Path, help="report folder (default: <group folder>/report)")


def run(args: argparse.Namespace) -> None:
    folder = Path(args.group) if Path(args.group).is_dir() else args.root / args.group
    name = folder.name
    members = sweep_members(name) if name in available_experiments() else {}
    runs = _in_member_order(read_runs(given_runs(args.runs) or find_runs(folder), members), list(members))
    baseline = named_baseline(args.baseline, runs) if args.baseline else default_baseline(runs, list(members))
    out = args.out or folder / REPORT_DIR
    check_output_dir(out, "--out" if args.out else "report folder")
    notes = missing_data(runs, [] if args.runs else list(members))
    for note in notes:
        print(f"dreamshot report: warning: {note}", file=sys.stderr)
    report = write_report(name, runs, out, baseline, notes)
    project, mode = wandb_setting(runs)
    if mode == "online":
        log_report(report, project, mode, out)
    print(report.table.to_markdown())
    print(f"\nreport  {report.markdown}\ntable   {report.csv} {report.json}")
    for plot in report.plots.values():
        print(f"plot    {plot}")


def given_runs(folders: list[Path]) -> list[Path]:
    """The RUN_DIRs of the command line, each a run folder named once: a typo or a folder named twice would
    otherwise be a row of its own in the table (a sweep member not run yet is a note; a folder named here is not)."""
    seen = set()
    for folder in folders:
        if not is_run(folder):
            what = "not found" if not folder.exists() else "not a folder" if not folder.is_dir() else "not a run folder"
            raise ConfigError(f"{folder}: {what} (a run folder holds {RUN_CONFIG} or {RESULTS_JSON})")
        if folder.resolve() in seen:
            raise ConfigError(f"{folder}: named twice among the runs to compare")
        seen.add(folder.resolve())
    return folders


def named_baseline(name: str, runs: list[RunRecord]) -> str:
    """The run `--baseline` names: a run's name, or a setting's (a member run with several seeds: its first run, so
    `--baseline without_racl` is the setting whose runs of each seed the others are measured against)."""
    names = [run.name for run in runs]
    return name if name in names else next((run.name for run in runs if run.setting == name), name)


def default_baseline(runs: list[RunRecord], members: list[str]) -> str | None:
    """The (first) run of the sweep's first member among the runs, else the first run; None for a single run. A
    member's run is told by its setting: run with several seeds, its runs are named `member (seed=1)`."""
    if len(runs) < 2:
        return None
    return next((run.name for member in members for run in runs if run.setting == member), runs[0].name)


def _in_member_order(runs: list[RunRecord], members: list[str]) -> list[RunRecord]:
    """Runs in the order the sweep lists its members (others after them, in folder order)."""
    return sorted(runs, key=lambda run: members.index(run.setting) if run.setting in members else len(members))
