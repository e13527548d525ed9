"""Stage 2, shot detection with PySceneDetect (appendix A.1): time ranges of the shots of a video.

A shot is [start, end) in seconds from the stream's start, not in frames: PySceneDetect's frame numbers are
its times multiplied by the average frame rate, which are not frame indices in a variable-frame-rate video
(phone footage). Stage 3 turns the times into frame indices with the decoded frames' timestamps.

Unit: shots. Shots shorter than `shots.min_shot_seconds` (flashes, transitions) are dropped; a video
PySceneDetect cannot read is dropped as undecodable, and the run goes on. The default backend, auto, reads a
video whose first frame is flagged interlaced with PyAV: OpenCV's decoder gets every interlaced frame the same
here, so it would see no cut; otherwise OpenCV, which is faster.
"""

from __future__ import annotations

import scenedetect

from dreamshot.prepare.config import PrepareConfig, ShotsConfig
from dreamshot.prepare.stage import UNDECODABLE, StageResult, VideoJob, unreadable
from dreamshot.prepare.video import first_frame_interlaced
from dreamshot.utils.errors import DataError

UNIT = "shots"
_DETECTORS = {
    "content": scenedetect.ContentDetector,
    "adaptive": scenedetect.AdaptiveDetector,
    "threshold": scenedetect.ThresholdDetector,
    "histogram": scenedetect.HistogramDetector,
    "hash": scenedetect.HashDetector,
}


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    try:
        shots = detect_shots(job, cfg.shots)
    except DataError as e:
        return unreadable(e, UNDECODABLE)
    kept = [shot for shot in shots if shot[1] - shot[0] >= cfg.shots.min_shot_seconds]
    dropped = len(shots) - len(kept)
    reasons = {f"shorter than {cfg.shots.min_shot_seconds:g} s": dropped} if dropped else {}
    return StageResult({"shots": kept}, kept=len(kept), dropped=reasons)


def detect_shots(job: VideoJob, cfg: ShotsConfig) -> list[list[float]]:
    """[start, end) time ranges in seconds of every shot, covering the whole video."""
    try:
        video = scenedetect.open_video(str(job.path), backend=shot_backend(job, cfg))
    except scenedetect.VideoOpenFailure as e:
        raise DataError(f"{job.path}: PySceneDetect cannot open the video ({e})") from None
    manager = scenedetect.SceneManager()
    manager.add_detector(make_detector(cfg))
    manager.detect_scenes(video)
    # start_in_scene: a video without a cut is one shot, not none.
    scenes = manager.get_scene_list(start_in_scene=True)
    return [[start.seconds, end.seconds] for start, end in scenes]


def shot_backend(job: VideoJob, cfg: ShotsConfig) -> str:
    """PySceneDetect's backend for the video: `shots.backend`, with auto resolved by the first frame's flag."""
    if cfg.backend != "auto":
        return cfg.backend
    return "pyav" if first_frame_interlaced(job.path) else "opencv"


def make_detector(cfg: ShotsConfig) -> scenedetect.SceneDetector:
    """The configured PySceneDetect detector, its threshold set when the config gives one."""
    kwargs: dict = {"min_scene_len": float(cfg.min_scene_len)}
    if cfg.threshold is not None:
        kwargs["adaptive_threshold" if cfg.detector == "adaptive" else "threshold"] = cfg.threshold
    return _DETECTORS[cfg.detector](**kwargs)
