"""One run per output folder.

- `RunLock`: `<output_dir>/run.lock` holds the pid, host and start time of the run writing the folder, from its
  first write to its end. Another run is refused while that process lives. A lock left by a killed run on this
  host (its process is gone) is stale and taken over; one from another host cannot be checked and is refused
  with its owner named (delete it once that run has ended).
- `check_fresh_start`: a run never writes into a folder holding another run's checkpoints or LoRA files unless
  it resumes that run or `trainer.overwrite` says to start over (`clear_run` then deletes them first).
- `record_resume`: one line per resume in `<output_dir>/resumes.jsonl`: the checkpoint, its step and the config
  changes that were accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from dreamshot.training.callbacks import EXPORT_FILES, SUMMARY_FILE
from dreamshot.training.resume import CHECKPOINT_DIR, Resume, hpc_checkpoints
from dreamshot.utils.errors import DreamShotError
from dreamshot.utils.io import atomic_write_text

LOCK_FILE = "run.lock"
RESUME_LOG = "resumes.jsonl"


class RunLock:
    """The lock of an output folder (a context manager: taken on entry, released on exit)."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = Path(out), Path(out) / LOCK_FILE

    def check(self) -> None:
        """Raise a DreamShotError if a live run holds the folder (writes nothing)."""
        owner = self._owner()
        if not self._live(owner):
            return
        raise DreamShotError(
            f"output_dir {self.out} is in use by another run (pid {owner.get('pid')} on {owner.get('host')} since "
            f"{owner.get('started')}): wait for it to end or choose another output_dir (if no run uses the folder "
            f"any more, delete {self.path})"
        )

    def held(self) -> bool:
        """Whether a live run holds the folder (a run on another host counts as live: it cannot be checked)."""
        return self._live(self._owner())

    def __enter__(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self.check()  # a live owner: refused; a stale lock is removed and taken
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            return self
        raise DreamShotError(f"output_dir {self.out}: another run took {self.path} at the same time")

    def __exit__(self, *exc_info: Any) -> None:
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half written by a process killed as it took the lock: stale
        return owner if isinstance(owner, dict) else {}

    def _live(self, owner: dict[str, Any] | None) -> bool:
        return owner is not None and not self._stale(owner)

    @staticmethod
    def _stale(owner: dict[str, Any]) -> bool:
        pid = owner.get("pid")
        if not isinstance(pid, int) or owner.get("host") is None:
            return True
        return owner["host"] == socket.gethostname() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def run_contents(out: Path) -> list[str]:
    """What of a training run `out` holds: its checkpoint files or folders (Lightning's SLURM requeue ones too)
    and exported LoRA files."""
    checkpoints = out / CHECKPOINT_DIR
    found = sorted(f"{CHECKPOINT_DIR}/{p.name}" for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
    found += [path.name for path in hpc_checkpoints(out)]
    return found + [name for name in EXPORT_FILES.values() if (out / name).exists()]


def check_fresh_start(out: Path, resume: Resume | None, overwrite: bool) -> None:
    """Refuse to start a run (or resume another folder's checkpoint) in a folder holding another run."""
    if overwrite:
        return
    if resume is not None and out.resolve() in resume.path.resolve().parents:
        return  # the folder's own run, resumed
    contents = run_contents(out)
    if contents:
        shown = ", ".join(contents[:3]) + (f" and {len(contents) - 3} more" if len(contents) > 3 else "")
        raise DreamShotError(
            f"output_dir {out} holds another run ({shown}): resume it with trainer.ckpt_path=last, start over "
            "with trainer.overwrite=true (deletes its checkpoints and LoRA files), or choose another output_dir"
        )


def clear_run(out: Path) -> None:
    """Delete a run's checkpoints, LoRA files, summary and resume log (`trainer.overwrite`)."""
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    for path in hpc_checkpoints(out):
        path.unlink()
    for name in [*EXPORT_FILES.values(), SUMMARY_FILE, RESUME_LOG]:
        (out / name).unlink(missing_ok=True)


def record_resume(out: Path, resume: Resume) -> None:
    """Append the resume (checkpoint, step, accepted changes) to `<out>/resumes.jsonl`, atomically."""
    path = out / RESUME_LOG
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(resume.path),
        "step": resume.step,
        "changed": {
            key: {"from": old, "to": new} for key, (old, new) in resume.changes.items() if key != "trainer.ckpt_path"
        },
    }
    atomic_write_text(path, before + json.dumps(line) + "\n")
