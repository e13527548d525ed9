"""A run's logged metrics, step by step, from its CSV logs (`csv/version_N/metrics.csv`, written beside W&B by
every run: W&B's own `.wandb` log is a format that library owns, and an offline run must be readable without
syncing). Each launch adds a version. A resumed run's version starts at its checkpoint's step: what the versions
before it logged after that step (a killed run's steps past its last checkpoint, or the steps of an earlier
training, under other settings, that it trains again) is dropped, and the later value of a (step, metric) wins. A
version starting at the first step logged (`trainer.overwrite`: a run started over in the folder) replaces what came
before it. So every curve is the one the run as it stands trained, finished or not."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dreamshot.utils.errors import DataError

# Step column of Lightning's CSV logger.
CSV_STEP = "step"


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {optimizer step: value} of every metric the run logged (empty when it logged nothing)."""
    curves: dict[str, dict[int, float]] = {}
    for rows in _csv_versions(run_dir):
        if rows:
            curves = _before(curves, min(step for step, _ in rows))
        for step, values in rows:
            for key, value in values.items():
                if math.isfinite(value):  # NaN: a diagnostic with nothing to measure at that step
                    curves.setdefault(key, {})[step] = value
    return {key: dict(sorted(points.items())) for key, points in curves.items() if points}


def logged_steps(curves: dict[str, dict[int, float]]) -> int | None:
    """The optimizer steps the curves show taken (None: nothing logged). Lightning logs a step's values, and a
    validation after it, under the count of the steps before it: the first step's at 0."""
    last = max((max(curve) for curve in curves.values() if curve), default=None)
    return None if last is None else last + 1


def latest_launch(run_dir: Path) -> int | None:
    """N of the CSV log folder `csv/version_N` of the run's latest launch that logged anything (None: none did)."""
    files = _metrics_files(run_dir)
    return launch_number(files[-1]) if files else None


def launch_number(path: Path) -> int | None:
    """N of a launch's `csv/version_N/metrics.csv` (None: not such a path)."""
    number = path.parent.name.removeprefix("version_")
    return int(number) if path.parent.name.startswith("version_") and number.isdigit() else None


def last_value(curve: dict[int, float]) -> float:
    """The value at the curve's last step."""
    return curve[max(curve)]


def _before(curves: dict[str, dict[int, float]], start: int) -> dict[str, dict[int, float]]:
    """What earlier versions logged up to `start`, the first step of the next version; nothing when `start` is at or
    before everything they logged (the run started over)."""
    first = min((min(points) for points in curves.values() if points), default=start)
    if start <= first:
        return {}
    return {key: {step: v for step, v in points.items() if step <= start} for key, points in curves.items()}


def _csv_versions(run_dir: Path) -> list[list[tuple[int, dict[str, float]]]]:
    """The rows of every launch's metrics.csv, in launch order."""
    return [_read_metrics(path) for path in _metrics_files(run_dir)]


def _metrics_files(run_dir: Path) -> list[Path]:
    """Every launch's metrics.csv, in launch order."""
    files = [path for path in (run_dir / "csv").glob("version_*/metrics.csv") if launch_number(path) is not None]
    return sorted(files, key=launch_number)


def _read_metrics(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) of each row of one metrics.csv; DataError naming the file and line when a row
    is not Lightning's CSV logger's (no step column, a cell that is not a number). Every row the logger writes ends
    its line: a last line without its end is a row still being written (the run goes on) or cut by a kill, whose
    cells may be cut short (`0.4` of `0.45`), so it is not read; nor is a file not written yet."""
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if not complete:
        return []
    rows = []
    with io.StringIO(complete, newline="") as f:
        reader = csv.DictReader(f)
        if CSV_STEP not in (reader.fieldnames or []):
            raise DataError(f"{path}: no {CSV_STEP!r} column: not a metrics file of Lightning's CSV logger")
        for row in reader:
            try:
                values = {k: float(v) for k, v in row.items() if k not in ("epoch", CSV_STEP) and v not in ("", None)}
                rows.append((int(row[CSV_STEP]), values))
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}:{reader.line_num}: not a number ({e})") from None
    return rows
