"""Log a written report (its table and plots) to W&B, as one run of the group with job type `report`."""

from __future__ import annotations

import os
from pathlib import Path

from dreamshot.report.build import Report
from dreamshot.report.runs import RunRecord

DEFAULT_PROJECT = "dreamshot"


def wandb_setting(runs: list[RunRecord]) -> tuple[str, str]:
    """(project, mode) to log a report of `runs` under: the runs' `logger.project` and `logger.mode`, with the
    WANDB_MODE environment variable winning, as in training. Runs that logged to CSV only give `disabled`,
    whatever WANDB_MODE says: a report of runs that never used W&B creates no W&B run."""
    configs = [run.config for run in runs if run.config]
    project = next((c["logger.project"] for c in configs if "logger.project" in c), DEFAULT_PROJECT)
    if not any(c.get("logger.backend") == "wandb" for c in configs):
        return project, "disabled"
    mode = next((c["logger.mode"] for c in configs if "logger.mode" in c), "offline")
    return project, os.environ.get("WANDB_MODE", mode)


def log_report(report: Report, project: str, mode: str, save_dir: Path) -> None:
    """Log `report` to a new W&B run in its group: the comparison table and every plot as an image."""
    import wandb  # imported here: only reports logged to W&B need it

    table = report.table
    columns = ["run", *table.swept_keys, *table.metrics]
    swept = {run: [_plain(table.swept[run][key]) for key in table.swept_keys] for run in table.runs}
    data = [[run, *swept[run], *(table.rows[run].get(m) for m in table.metrics)] for run in table.runs]
    run = wandb.init(
        project=project,
        name=f"{table.group}/report",
        group=table.group,
        job_type="report",
        tags=["report"],
        dir=str(save_dir),
        mode=mode,
    )
    try:
        images = {f"report/{name}": wandb.Image(str(path)) for name, path in report.plots.items()}
        run.log({"report/table": wandb.Table(columns=columns, data=data), **images})
    finally:
        run.finish()


def _plain(value):
    """W&B table cells hold scalars: lists (e.g. data.sources) become text."""
    return value if isinstance(value, int | float | str | None) else str(value)
