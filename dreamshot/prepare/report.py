"""The run summary: per stage, what was kept and what was dropped and why, as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dreamshot.prepare.stage import StageResult
from dreamshot.utils.io import atomic_write_text

REPORT_NAME = "prepare_report.json"


@dataclass
class StageCounts:
    """Totals of one stage over the videos that reached it; `done` counts the videos it ran for in this run
    (the others were read back from their state files)."""

    stage: str
    unit: str
    videos: int = 0
    done: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def add(self, result: StageResult, ran: bool) -> None:
        self.videos += 1
        self.done += int(ran)
        self.kept += result.kept
        for reason, n in result.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def format_table(counts: list[StageCounts]) -> str:
    """A plain-text table: stage, unit, videos reaching it (run now), kept, dropped, reasons."""
    header = ("stage", "unit", "videos (run)", "kept", "dropped", "why dropped")
    rows = [
        (
            c.stage,
            c.unit,
            f"{c.videos} ({c.done})",
            str(c.kept),
            str(c.dropped_total),
            ", ".join(f"{reason}: {n}" for reason, n in c.dropped.items()) or "-",
        )
        for c in counts
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in (header, *rows)
    ]
    return "\n".join(lines)


def write_report(counts: list[StageCounts], path: Path, extra: dict) -> None:
    """The counts as JSON (with `extra`, e.g. the manifest path and group totals), written atomically."""
    stages = [
        {"stage": c.stage, "unit": c.unit, "videos": c.videos, "run": c.done, "kept": c.kept, "dropped": c.dropped}
        for c in counts
    ]
    atomic_write_text(path, json.dumps({"stages": stages, **extra}, indent=2) + "\n")
