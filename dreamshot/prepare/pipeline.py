"""`dreamshot prepare`: videos to storyboard groups, stage by stage (appendix A), resumable per video.

Stages run in order over all videos (one progress bar each); a video goes on to the next stage while it
keeps something. Each (video, stage) result is stored in a state file (`dreamshot.prepare.state`) and read
back instead of recomputed when its inputs are unchanged, so an interrupted run resumes where it stopped
and a finished one costs nothing to rerun (it first deletes the temporary files a killed run left). Before
anything is decoded, the output folder's disk is checked for what the videos may give (`space.py`). A stage
that no video gets through ends the run with a DataError (there would be no groups); its results are stored
only once a video has got through it, so a folder with no readable video leaves nothing behind. After the
manifest is written, the images under `frames/` and `groups/` that no state file records are deleted: an
earlier run's with other settings, which no run can read back. At the end the output folder holds:

    manifest.jsonl          the storyboard groups (DESIGN §4 format, checked by the training loader)
    provenance.jsonl        per group: whether its masks and text come from a model or a placeholder
    prepare_report.json     per stage: units kept, dropped and why
    frames/<video>/...      full-size keyframes;  groups/<video>/<group>/...  masks and references
    state/<video>/<stage>.json
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from dreamshot.data.manifest import load_manifest
from dreamshot.prepare import curation, grouping, keyframes, quality, roles, shots
from dreamshot.prepare.backends import Backends, build_backends
from dreamshot.prepare.config import PrepareConfig
from dreamshot.prepare.report import REPORT_NAME, StageCounts, write_report
from dreamshot.prepare.space import prepare_bytes
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.state import StateStore, digest
from dreamshot.prepare.video import reading_corrections
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import (
    atomic_path,
    atomic_write_text,
    check_output_dir,
    folder_bytes,
    remove_stale_temporaries,
)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts")
# Part of every state digest: raised when what a stage stores changes meaning (2: shots in seconds, not frame
# numbers), so that state files of an older version are recomputed rather than misread.
STATE_FORMAT = 2
MANIFEST_NAME = "manifest.jsonl"
PROVENANCE_NAME = "provenance.jsonl"
# The folders of the stages' images (`StageResult.files`), whose images are the pipeline's own to delete.
IMAGE_DIRS = ("frames", "groups")


# The `vlm` settings that change its answers; not how long to wait or how often to ask, so that raising
# vlm.timeout_s after requests timed out does not pay for every video's questions again.
VLM_ANSWER_KEYS = ("endpoint", "model", "image_size")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, its module (`run(job, inputs, cfg, backends)` and `UNIT`), the config
    section its result depends on and, for a stage that may ask the VLM, the setting that selects it."""

    name: str
    module: ModuleType
    section: str
    vlm_switch: str | None = None

    def settings(self, cfg: PrepareConfig) -> list:
        """What the stage's result depends on in `cfg`: its section, and the VLM's answer settings when it
        asks the VLM."""
        settings = [cfg.section(self.section)]
        if self.vlm_switch is not None and settings[0][self.vlm_switch] == "vlm":
            settings.append({key: cfg.section("vlm")[key] for key in VLM_ANSWER_KEYS})
        return settings


STAGES = (
    Stage("curation", curation, "curation"),
    Stage("shots", shots, "shots"),
    Stage("keyframes", keyframes, "keyframes"),
    Stage("quality", quality, "quality"),
    Stage("grouping", grouping, "grouping", vlm_switch="judge"),
    Stage("roles", roles, "roles", vlm_switch="annotator"),
)


@dataclass
class PrepareSummary:
    """What a run produced: per-stage counts, the manifest and how many groups and shots it holds, and how many
    images of earlier runs it deleted (`remove_unrecorded_images`)."""

    counts: list[StageCounts]
    manifest: Path
    groups: int
    shots: int
    removed: int = 0


def find_videos(videos_dir: Path, out_dir: Path, progress: bool = False) -> list[VideoJob]:
    """The video files under `videos_dir` (recursively, by suffix), sorted, with ids from their relative paths."""
    if not videos_dir.is_dir():
        raise DataError(f"{videos_dir}: not a folder of videos")
    paths = sorted(p for p in videos_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise DataError(f"{videos_dir}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    jobs, seen = [], {}
    for path in paths:
        video_id = re.sub(r"[^A-Za-z0-9._-]+", "_", path.relative_to(videos_dir).with_suffix("").as_posix())
        if video_id in seen:
            raise DataError(f"{path}: has the same id {video_id!r} as {seen[video_id]} (rename one)")
        seen[video_id] = path
        jobs.append(VideoJob(video_id, path, out_dir, progress))
    return jobs


def video_key(path: Path) -> str:
    """The first digest of a video's chain: the state format, the file's size and modification time, and the
    corrections of its reading made since format 2 (`video.reading_corrections`: none for most videos, whose
    keys, and so their stored stages, stay those of format 2)."""
    stat = path.stat()
    return digest(STATE_FORMAT, stat.st_size, stat.st_mtime_ns, *reading_corrections(path))


def prepare(
    videos_dir: str | Path,
    out_dir: str | Path,
    cfg: PrepareConfig,
    backends: Backends | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Run every stage over the videos of `videos_dir` into `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir).absolute()
    jobs = find_videos(Path(videos_dir), out_dir, progress)
    # Before a model is built or a video decoded; what the folder holds (a resumed run) is not written again.
    need = prepare_bytes(jobs, cfg) - folder_bytes(out_dir)
    check_output_dir(out_dir, "--out", need, f"the keyframes, masks and references of {len(jobs)} videos")
    backends = backends or build_backends(cfg)
    _remove_stale_temporaries(out_dir)
    store = StateStore(out_dir)
    inputs: dict[str, dict] = {job.id: {} for job in jobs}
    # The chain of digests: the state format, a video's file identity and how it is read, then each stage's
    # settings on top of the one before.
    keys = {job.id: video_key(job.path) for job in jobs}
    counts = []
    for stage in STAGES:
        tally = StageCounts(stage.name, stage.module.UNIT)
        survivors, unsaved = [], []
        for job in tqdm(jobs, desc=f"{stage.name:<9}", unit="video", disable=not progress):
            keys[job.id] = digest(stage.name, stage.settings(cfg), keys[job.id])
            result = store.load(job.id, stage.name, keys[job.id])
            ran = result is None
            if result is None:
                result = stage.module.run(job, inputs[job.id], cfg, backends)
                unsaved.append((job.id, stage.name, keys[job.id], result))
            tally.add(result, ran)
            inputs[job.id][stage.name] = result.data
            if result.kept:
                survivors.append(job)
            if survivors:
                for saved in unsaved:
                    store.save(*saved)
                unsaved.clear()
        if not survivors:
            raise _nothing_kept(Path(videos_dir), tally, [inputs[job.id][stage.name] for job in jobs])
        counts.append(tally)
        jobs = survivors
    summary = _finish(out_dir, counts, [inputs[job.id]["roles"] for job in jobs])
    summary.removed = remove_unrecorded_images(out_dir, store.recorded_files())
    return summary


def remove_unrecorded_images(out_dir: Path, recorded: set[str]) -> int:
    """Delete the PNG files under `IMAGE_DIRS` not in `recorded` (paths relative to `out_dir`), then the folders
    there left empty; returns how many files. Run after the manifest is written, with every state file's files:
    an image none records was written by a run with other settings, for a (video, stage) whose state has since
    been replaced, so no run reads it again. Other files (a user's) and other folders are left alone."""
    removed = 0
    for root in (out_dir / name for name in IMAGE_DIRS):
        for path in sorted(root.rglob("*.png")):
            if path.is_file() and path.relative_to(out_dir).as_posix() not in recorded:
                path.unlink()
                removed += 1
        # Deepest first, so a group's folder goes before its video's.
        for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    return removed


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the temporary files of a killed run (images, state): they are never read, only in the way."""
    if out_dir.is_dir():
        for folder in [out_dir, *out_dir.rglob("*/")]:
            remove_stale_temporaries(folder)


def _nothing_kept(videos_dir: Path, tally: StageCounts, data: list[dict]) -> DataError:
    """The error of a stage that no video got through: its drop reasons and the first unreadable file's fault."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in tally.dropped.items()) or "none found"
    errors = [item["error"] for item in data if "error" in item]
    first = f"; first: {errors[0]}" if errors else ""
    return DataError(f"{videos_dir}: no storyboard groups: {tally.stage} kept no {tally.unit} ({reasons}){first}")


def _finish(out_dir: Path, counts: list[StageCounts], outputs: list[dict]) -> PrepareSummary:
    """Write the manifest (once it passes the training loader's checks), provenance and report."""
    records = [record for output in outputs for record in output["records"]]
    manifest = out_dir / MANIFEST_NAME
    with atomic_path(manifest) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
        try:
            # Checked under its temporary name beside the old one (paths are relative to the folder), so a
            # manifest the loader refuses never replaces the last good one.
            checked = load_manifest(tmp)
        except DataError as e:
            raise DataError(f"{str(e).replace(str(tmp), str(manifest))} (the manifest was not replaced)") from None
    provenance = [{"id": r["id"], **output["provenance"]} for output in outputs for r in output["records"]]
    atomic_write_text(out_dir / PROVENANCE_NAME, "".join(json.dumps(p) + "\n" for p in provenance))
    shot_count = sum(len(r.shots) for r in checked)
    write_report(
        counts, out_dir / REPORT_NAME, {"manifest": str(manifest), "groups": len(checked), "shots": shot_count}
    )
    return PrepareSummary(counts, manifest, len(checked), shot_count)
