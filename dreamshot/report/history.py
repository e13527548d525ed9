"""A run's logged metrics, step by step: from its CSV logs (`csv/version_N/metrics.csv`) or, when it logged to
W&B, from its offline W&B run files. A resumed run adds a version (or an offline run) that logs some steps
again; the later value of a (step, metric) wins, so every curve is the one the finished run stands on."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dreamshot.report.wandb_offline import offline_runs, read_history

# Step column of Lightning's CSV logger, and the key Lightning logs the step under in W&B.
CSV_STEP = "step"
WANDB_STEP = "trainer/global_step"


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {optimizer step: value} of every metric the run logged (empty when it logged nothing)."""
    rows = _csv_rows(run_dir) or _wandb_rows(run_dir)
    curves: dict[str, dict[int, float]] = {}
    for step, values in rows:
        for key, value in values.items():
            if math.isfinite(value):  # NaN: a diagnostic with nothing to measure at that step
                curves.setdefault(key, {})[step] = value
    return {key: dict(sorted(points.items())) for key, points in curves.items()}


def last_value(curve: dict[int, float]) -> float:
    """The value at the curve's last step."""
    return curve[max(curve)]


def _csv_rows(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows = []
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k not in ("epoch", CSV_STEP) and v not in ("", None)}
                rows.append((int(row[CSV_STEP]), values))
    return rows


def _wandb_rows(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    for path in offline_runs(run_dir):
        for row in read_history(path):
            if WANDB_STEP in row:
                values = {k: v for k, v in row.items() if not k.startswith("_") and k not in ("epoch", WANDB_STEP)}
                rows.append((int(row[WANDB_STEP]), values))
    return rows
