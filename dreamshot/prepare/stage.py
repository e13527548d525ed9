"""What every stage of `dreamshot prepare` takes and gives: one video's job, and its result for one stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamshot.utils.errors import DataError

# Drop reason of a video that opens but fails to decode in stage 2 or 3 (a broken download): the run goes on.
UNDECODABLE = "undecodable video"


@dataclass(frozen=True)
class VideoJob:
    """One input video: its id (unique in the run, used in file and group names), file and the output folder,
    and whether the stages show progress bars within the video (a film's decoding pass takes minutes)."""

    id: str
    path: Path
    out_dir: Path
    progress: bool = False

    def output(self, *parts: str) -> Path:
        """A path under the output folder's `<part>/<video id>/...` tree (e.g. `output("frames", "s001.png")`)."""
        return self.out_dir.joinpath(parts[0], self.id, *parts[1:])


@dataclass
class StageResult:
    """A stage's outcome for one video.

    `data` (JSON-able) is what later stages read; `kept` counts the units that go on (videos, shots,
    keyframes or groups, as the stage says) and `dropped` counts the others by reason. A video with
    nothing kept stops at that stage. `files` are the files it wrote that later stages or the manifest
    read (paths relative to the output folder): a stored result missing one of them is made again.
    """

    data: dict[str, Any]
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "kept": self.kept, "dropped": self.dropped, "files": self.files}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StageResult:
        return cls(obj["data"], obj["kept"], obj["dropped"], obj["files"])


def unreadable(error: DataError, reason: str) -> StageResult:
    """The result of a video a stage cannot read: nothing kept, and the fault (one line naming the file) kept
    for the message of a run that no video gets through."""
    return StageResult({"error": str(error)}, kept=0, dropped={reason: 1})


def count(reasons: list[str]) -> dict[str, int]:
    """Reason -> how many times it occurs, in first-seen order."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts
