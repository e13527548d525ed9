"""Evaluation results: results.json, results.csv, the W&B tables, and the side-by-side table against the
paper's published rows for the benchmark and mode (CIDS and CSD printed x100, as the paper does)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamshot.eval.published import HEADERS, PERCENT, R2S_COLUMNS, SELF_COLUMNS, published_table
from dreamshot.utils.io import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
MISSING = "missing"
# Not a mean over stories: the mean of the four alignment dimensions' dataset-level means.
NOT_STORY_MEANS = frozenset({"alignment"})


@dataclass
class EvalResults:
    """Dataset-level `values` (plain means over stories, raw scale), the value names that are `missing` (name ->
    reason), and the values of every story."""

    benchmark: str
    mode: str
    label: str
    values: dict[str, float]
    missing: dict[str, str]
    per_story: dict[str, dict[str, float]]
    # Shots scored per story: the x axis of the metric-vs-shot-count plot (paper Fig. 13) in `dreamshot report`.
    story_shots: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shots(self) -> int:
        return sum(self.story_shots.values())

    def stories_with(self, name: str) -> int:
        """How many stories the dataset-level value `name` averages: those with a value of their own (e.g. a
        story whose character references give no feature has no CIDS, as in ViStoryBench)."""
        return sum(name in values for values in self.per_story.values())

    def partial_values(self) -> dict[str, int]:
        """The story means over fewer stories than the run scored, and over how many."""
        counts = {name: self.stories_with(name) for name in self.values if name not in NOT_STORY_MEANS}
        return {name: count for name, count in counts.items() if count < len(self.story_shots)}

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            name: {"value": value} if name in NOT_STORY_MEANS else {"value": value, "stories": self.stories_with(name)}
            for name, value in self.values.items()
        }
        metrics.update({name: {"status": MISSING, "reason": reason} for name, reason in self.missing.items()})
        return {
            "benchmark": self.benchmark,
            "mode": self.mode,
            "label": self.label,
            "stories": len(self.per_story),
            "shots": self.shots,
            "metrics": metrics,
            "per_story": self.per_story,
            "story_shots": self.story_shots,
            **self.extra,
        }


def comparison(results: EvalResults) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): the published rows of the benchmark and mode, then this run's row, as printed text.

    Without published rows (the toy benchmark) the mode's paper columns come first, then every other value
    this run computed (e.g. the toy proxies).
    """
    table = published_table(results.benchmark, results.mode)
    columns = list(table.columns if table else R2S_COLUMNS if results.mode == "r2s" else SELF_COLUMNS)
    if table is None:
        columns += [name for name in results.values if name not in columns]
    published = table.rows.items() if table else []
    rows = [[name, *(_number(c, v) for c, v in zip(columns, values, strict=True))] for name, values in published]
    rows.append([results.label, *(_ours(results, name) for name in columns)])
    return ["method", *(HEADERS.get(name, name) for name in columns)], rows


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(_pad(cell, w, i) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(results: EvalResults) -> str:
    """The printed report: the table, its source, and the missing values with their reasons."""
    table = published_table(results.benchmark, results.mode)
    source = table.source if table else f"no published rows for {results.benchmark} / {results.mode}"
    text = [
        f"{results.benchmark} / {results.mode}: {len(results.per_story)} stories, {results.shots} shots ({source})",
        format_table(*comparison(results)),
    ]
    if table and len(results.story_shots) != table.stories:
        # E.g. ViStoryBench's lite split, or a test file of one's own: the paper's rows scored other stories.
        text.append(
            f"note: the published rows score {table.stories} stories, this run {len(results.story_shots)}: "
            "not the same stories, so not comparable row for row"
        )
    partial = results.partial_values()
    if partial:
        counts = ", ".join(f"{name} {count}" for name, count in partial.items())
        text.append(
            f"note: of the {len(results.story_shots)} stories, these values average only {counts} (the others have "
            "none: see the warnings above)"
        )
    if results.missing:
        text.append(missing_line(results.missing))
    return "\n".join(text)


def missing_line(missing: dict[str, str]) -> str:
    """One line for every missing value, grouped by reason: `missing: a, b (reason); c (other reason)`."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in missing.items():
        by_reason.setdefault(reason, []).append(name)
    return "missing: " + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


def write_results(out: Path, results: EvalResults) -> tuple[Path, Path]:
    """results.json and results.csv (one row per story, then the mean) in `out`, written atomically."""
    json_path, csv_path = out / RESULTS_JSON, out / RESULTS_CSV
    atomic_write_text(json_path, json.dumps(results.to_json(), indent=2))
    columns = list(results.values) + [name for name in results.missing if name not in results.values]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["story", *columns])
    for story, values in results.per_story.items():
        writer.writerow([story, *(_raw(values.get(name)) for name in columns)])
    writer.writerow(["mean", *(_raw(results.values[n]) if n in results.values else MISSING for n in columns)])
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def log_tables(run, results: EvalResults) -> None:
    """Log the comparison table, the per-story table and the dataset-level values to a W&B run."""
    import wandb  # imported here: only runs logging to W&B need it

    headers, rows = comparison(results)
    columns = list(results.values)
    per_story = [[story, *(values.get(name) for name in columns)] for story, values in results.per_story.items()]
    run.log(
        {
            "eval/comparison": wandb.Table(columns=headers, data=rows),
            "eval/per_story": wandb.Table(columns=["story", *columns], data=per_story),
            **{f"eval/{name}": value for name, value in results.values.items()},
        }
    )


def _pad(cell: str, width: int, column: int) -> str:
    return cell.ljust(width) if column == 0 else cell.rjust(width)


def _ours(results: EvalResults, name: str) -> str:
    if name in results.values:
        return _number(name, results.values[name] * 100 if is_cosine(name) else results.values[name])
    return MISSING if name in results.missing else "-"


def is_cosine(name: str) -> bool:
    """Cosine values (CIDS, CSD and the toy proxies) are printed x100."""
    return name in PERCENT or name.startswith("toy_")


def _number(name: str, value: float) -> str:
    return f"{value:.1f}" if is_cosine(name) else f"{value:.2f}"


def _raw(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
