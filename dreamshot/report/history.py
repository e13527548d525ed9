"""A run's logged metrics, step by step, from its CSV logs (`csv/version_N/metrics.csv`, written beside W&B by
every run: W&B's own `.wandb` log is a format that library owns, and an offline run must be readable without
syncing). A resumed run adds a version that logs some steps again; the later value of a (step, metric) wins, so
every curve is the one the finished run stands on."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dreamshot.utils.errors import DataError

# Step column of Lightning's CSV logger.
CSV_STEP = "step"


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {optimizer step: value} of every metric the run logged (empty when it logged nothing)."""
    curves: dict[str, dict[int, float]] = {}
    for step, values in _csv_rows(run_dir):
        for key, value in values.items():
            if math.isfinite(value):  # NaN: a diagnostic with nothing to measure at that step
                curves.setdefault(key, {})[step] = value
    return {key: dict(sorted(points.items())) for key, points in curves.items()}


def last_value(curve: dict[int, float]) -> float:
    """The value at the curve's last step."""
    return curve[max(curve)]


def _csv_rows(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return [row for path in versions for row in _read_metrics(path)]


def _read_metrics(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) of each row of one metrics.csv; DataError naming the file and line when a row
    is not Lightning's CSV logger's (no step column, a cell that is not a number)."""
    rows = []
    with path.open(newline="") as f:
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
