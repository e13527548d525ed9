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
"""

from __future__ import annotations

import json
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
from dreamshot.utils.io import atomic_path, atomic_write_text

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
    table = build_table(group, runs, baseline, notes)
    figures = draw_figures(table, runs)
    plots = {name: _save(figure, out / PLOTS_DIR / f"{name}.png") for name, figure in figures.items()}
    for name in TITLES.keys() - plots.keys():
        # An earlier report's figure these runs no longer have the data for: left there, it would pass for theirs.
        (out / PLOTS_DIR / f"{name}.png").unlink(missing_ok=True)
    markdown, csv_path, json_path = out / REPORT_MD, out / REPORT_CSV, out / REPORT_JSON
    atomic_write_text(markdown, _markdown(table, runs, plots, out))
    atomic_write_text(csv_path, table.to_csv())
    listed = {name: path.relative_to(out).as_posix() for name, path in plots.items()}
    atomic_write_text(json_path, json.dumps({"table": asdict(table), "plots": listed}, indent=2))
    return Report(table, markdown, csv_path, json_path, plots)


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


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def _markdown(table: ComparisonTable, runs: list[RunRecord], plots: dict[str, Path], out: Path) -> str:
    swept = ", ".join(table.swept_keys) or "nothing (the runs share every config value)"
    lines = [
        f"# {table.group}",
        "",
        f"{len(runs)} runs; baseline: {table.baseline or 'none'}; swept: {swept}.",
        "",
        "| run | folder | steps | evaluations |",
        "|---|---|---:|---|",
        *(
            f"| {run.name} | `{run.path}` | {run.steps if run.steps is not None else '-'} | "
            f"{', '.join(e.label for e in run.evals) or '-'} |"
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
        lines += ["", f"## {TITLES[name]}", "", f"![{name}]({path.relative_to(out).as_posix()})"]
    return "\n".join(lines) + "\n"
