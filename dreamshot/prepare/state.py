"""Per-video, per-stage state files: a rerun skips every (video, stage) already done with the same inputs.

`<out>/state/<video id>/<stage>.json` holds the stage's result and a digest of everything it depended on:
the stage's settings, the digest of the stage before it and, for the first stage, the video file's size and
modification time. A changed setting therefore redoes that stage and the ones after it, for every video,
and nothing else. A result whose files (`StageResult.files`) are not all there is made again; the stages
are deterministic, so the later ones stay valid. Files are written atomically, so an interrupted run
leaves finished stages intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dreamshot.prepare.stage import StageResult
from dreamshot.utils.io import atomic_write_text

STATE_DIR = "state"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StateStore:
    """Reads and writes the state files under `<out_dir>/state`."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.root = out_dir, out_dir / STATE_DIR

    def path(self, video_id: str, stage: str) -> Path:
        return self.root / video_id / f"{stage}.json"

    def load(self, video_id: str, stage: str, key: str) -> StageResult | None:
        """The stored result when it was made from the same inputs (`key`) and the files it wrote are all
        there (a user may have deleted some to free space), else None."""
        path = self.path(video_id, stage)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # an unreadable state file only means the stage runs again
        if obj.get("digest") != key:
            return None
        result = StageResult.from_json(obj)
        return result if all((self.out_dir / name).is_file() for name in result.files) else None

    def recorded_files(self) -> set[str]:
        """The files every state file records, whatever its digest (a later run with its settings reads them
        back): paths relative to the output folder. An unreadable state file records none (its stage runs again)."""
        names: set[str] = set()
        for path in self.root.glob("*/*.json"):
            try:
                names.update(json.loads(path.read_text())["files"])
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                continue
        return names

    def save(self, video_id: str, stage: str, key: str, result: StageResult) -> None:
        atomic_write_text(self.path(video_id, stage), json.dumps({"digest": key, **result.to_json()}) + "\n")
