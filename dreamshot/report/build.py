"""Write a group's report: `report.md` (tables and plots), `report.csv`, and `plots/*.png`.

```
<out>/report.md                         the metric table, the relative improvement over the baseline, the plots
<out>/report.csv                        one row per run: swept values, metrics, relative improvement
<out>/report.json                       the table and the plot files, for programs (`read_report`)
<out>/plots/relative_improvement.png    with a baseline (paper Fig. 9 / Fig. 12)
<out>/plots/shot_count.png              when an evaluation's stories have two shot counts or more (paper Fig. 13)
<out>/plots/guidance_grid.png           when the runs sweep inference.omega1 and inference.omega2 (paper Fig. 8)
<out>/plots/loss_curves.png             when the runs logged training curves
```

The files are one unit: written into a hidden sibling folder (`.<out>.partial`) and put in place of the old report
folder by renames (`utils.io.commit_folder`), so a kill or an error leaves the old report or the new one, never a mix
(nor an earlier report's plot these runs no longer draw). What else the old folder holds (W&B's `wandb/` of a logged
report, a user's own files) is kept: hard-linked into the new folder before the swap.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from dreamshot.report.plots import (
    guidance_grid_figure,
    loss_curves_figure,
    relative_improvement_figure,
    shot_count_figure,
)
from dreamshot.report.runs import RunRecord
from dreamshot.report.table import ComparisonTable, build_table
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.io import commit_folder, partial_folder, remove_path

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PLOTS_DIR = "plots"
TITLES = {
    "relative_improvement": "Relative improvement over the baseline",
    "shot_count": "Metrics against the shot count",
    "guidance_grid": "Guidance weights ω1 / ω2",
    "loss_curves": "Training curves",
}
# The entries of a report folder that a report writes; the others are the folder's own, kept when it is replaced.
REPORT_ENTRIES = (REPORT_MD, REPORT_CSV, REPORT_JSON, PLOTS_DIR)


@dataclass
class Report:
    """What `write_report` wrote: the table and the files (plot name -> PNG path)."""

    table: ComparisonTable
    markdown: Path
    csv: Path
    json: Path
    plots: dict[str, Path] = field(default_factory=dict)


def write_report(
    group: str, runs: list[RunRecord], out: Path, baseline: str | None = None, notes: list[str] | None = None
) -> Report:
    """Compare `runs` (relative improvement against the run named `baseline`) and write the report into `out`;
    `notes` (what is missing) go under the table."""
    final = out.resolve()  # a folder named `.` or through a symlink: the folder itself is replaced
    _check_holds_no_run(final, runs)
    table = build_table(group, runs, baseline, notes)
    figures = draw_figures(table, runs)
    written = partial_folder(final)
    remove_path(written)  # left by a report killed while it was written
    try:
        plots = _write_files(written, table, runs, figures)
        _keep_folder_files(final, written)
        commit_folder(written, final)
    finally:
        remove_path(written)  # an error on the way: the old report stays as it was
    paths = {name: out / path for name, path in plots.items()}
    return Report(table, out / REPORT_MD, out / REPORT_CSV, out / REPORT_JSON, paths)


def _check_holds_no_run(folder: Path, runs: list[RunRecord]) -> None:
    """Refuse a report folder that holds one of the runs (`--out` naming the group folder, say): replacing it whole
    would move a run still training, and the files it writes, out from under it."""
    inside = [run.path for run in runs if run.path.resolve().is_relative_to(folder)]
    if inside:
        raise ConfigError(
            f"{folder}: the report folder holds the run folder {inside[0]}; give the report a folder of its own "
            "(the default: <group folder>/report)"
        )


def _write_files(
    folder: Path, table: ComparisonTable, runs: list[RunRecord], figures: dict[str, Figure]
) -> dict[str, Path]:
    """Write the report's files into the new folder `folder`; the plots' paths (name -> path relative to it)."""
    folder.mkdir(parents=True)
    plots = {name: Path(PLOTS_DIR) / f"{name}.png" for name in figures}
    for name, figure in figures.items():
        (folder / PLOTS_DIR).mkdir(exist_ok=True)
        figure.savefig(folder / plots[name], format="png", dpi=120)
    (folder / REPORT_MD).write_text(_markdown(table, runs, plots), encoding="utf-8")
    (folder / REPORT_CSV).write_text(table.to_csv(), encoding="utf-8")
    listed = {name: path.as_posix() for name, path in plots.items()}
    (folder / REPORT_JSON).write_text(json.dumps({"table": asdict(table), "plots": listed}, indent=2), encoding="utf-8")
    return plots


def read_report(out: Path) -> tuple[ComparisonTable, dict[str, Path]]:
    """A report `write_report` wrote into `out`: its table and its plots (name -> PNG path)."""
    path = out / REPORT_JSON
    if not path.is_file():
        raise ConfigError(f"{out}: no {REPORT_JSON} (write the report first: dreamshot report GROUP)")
    body = json.loads(path.read_text())
    return ComparisonTable(**body["table"]), {name: out / plot for name, plot in body["plots"].items()}


def draw_figures(table: ComparisonTable, runs: list[RunRecord]) -> dict[str, Figure]:
    """Every figure the runs have the data for, by name."""
    figures = {
        "relative_improvement": relative_improvement_figure(table) if table.relative() else None,
        "shot_count": shot_count_figure(runs, table.group),
        "guidance_grid": guidance_grid_figure(table),
        "loss_curves": loss_curves_figure(runs, table.group),
    }
    return {name: figure for name, figure in figures.items() if figure is not None}


def _keep_folder_files(old: Path, new: Path) -> None:
    """Hard-link into the new report folder what the old one holds besides a report (copied where the filesystem
    has no hard links), so that replacing the folder loses none of it."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in REPORT_ENTRIES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _markdown(table: ComparisonTable, runs: list[RunRecord], plots: dict[str, Path]) -> str:
    """`plots`: name -> PNG path relative to the report folder."""
    swept = ", ".join(table.swept_keys) or "nothing (the runs share every config value)"
    lines = [
        f"# {table.group}",
        "",
        f"{len(runs)} runs; baseline: {table.baseline or 'none'}; swept: {swept}.",
        "",
        "| run | folder | steps | evaluations |",
        "|---|---|---:|---|",
        *(
            f"| {run.name} | `{run.path}` | {run.described_steps()} | "
            f"{', '.join(e.described() for e in run.evals) or '-'} |"
            for run in runs
        ),
        "",
        "## Metrics",
        "",
        "Final values: evaluation results (`results.json`; CIDS, CSD and the toy proxies ×100 as `dreamshot eval` "
        "prints them, raw in report.csv), then the last logged validation metrics.",
        "",
        table.to_markdown(),
    ]
    for name, path in plots.items():
        lines += ["", f"## {TITLES[name]}", "", f"![{name}]({path.as_posix()})"]
    return "\n".join(lines) + "\n"
