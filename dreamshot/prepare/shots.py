"""Stage 2, shot detection with PySceneDetect (appendix A.1): time ranges of the shots of a video.

A shot is [start, end) in seconds from the stream's start, not in frames: PySceneDetect's frame numbers are
its times multiplied by the average frame rate, which are not frame indices in a variable-frame-rate video
(phone footage). Stage 3 turns the times into frame indices with the decoded frames' timestamps.

Unit: shots. Shots shorter than `shots.min_shot_seconds` (flashes, transitions) are dropped; a video
PySceneDetect cannot read is dropped as undecodable, and the run goes on. PySceneDetect reads the stream that
stages 1 and 3 read, the one a player plays (`video.played_stream`): its PyAV backend is told which; OpenCV
reads the file's first video stream and cannot be told, so a video whose first video stream is another (cover
art) is read with PyAV under auto and dropped under `shots.backend: opencv`. The default backend, auto, also
reads a video whose first frame is flagged interlaced with PyAV: OpenCV's decoder gets every interlaced frame
the same here, so it would see no cut; otherwise OpenCV, which is faster.
"""

from __future__ import annotations

from pathlib import Path

import scenedetect
from scenedetect.backends.pyav import VideoStreamAv
from tqdm import tqdm

from dreamshot.prepare.config import PrepareConfig, ShotsConfig
from dreamshot.prepare.stage import UNDECODABLE, StageResult, VideoJob, unreadable
from dreamshot.prepare.video import first_frame_interlaced, video_stream_indices
from dreamshot.utils.errors import DataError

UNIT = "shots"
# Drop reason of a video `shots.backend: opencv` cannot read: its first video stream is not the played one.
OPENCV_STREAM = "first video stream not played (opencv)"
_DETECTORS = {
    "content": scenedetect.ContentDetector,
    "adaptive": scenedetect.AdaptiveDetector,
    "threshold": scenedetect.ThresholdDetector,
    "histogram": scenedetect.HistogramDetector,
    "hash": scenedetect.HashDetector,
}


class OpenCvStreamError(DataError):
    """OpenCV would read another stream than the one a player plays."""


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    try:
        shots = detect_shots(job, cfg.shots, inputs["curation"]["frames"])
    except OpenCvStreamError as e:
        return unreadable(e, OPENCV_STREAM)
    except DataError as e:
        return unreadable(e, UNDECODABLE)
    kept = [shot for shot in shots if shot[1] - shot[0] >= cfg.shots.min_shot_seconds]
    dropped = len(shots) - len(kept)
    reasons = {f"shorter than {cfg.shots.min_shot_seconds:g} s": dropped} if dropped else {}
    return StageResult({"shots": kept}, kept=len(kept), dropped=reasons)


def detect_shots(job: VideoJob, cfg: ShotsConfig, total: int | None = None) -> list[list[float]]:
    """[start, end) time ranges in seconds of every shot, covering the whole video (`total`: the frame count the
    container gives, for the progress bar)."""
    video = open_video(job, cfg)
    manager = scenedetect.SceneManager()
    manager.add_detector(make_detector(cfg))
    # PySceneDetect's own bar is off: it leaves a line per video.
    with tqdm(desc=f"  {job.id}", total=total, unit="frame", leave=False, disable=not job.progress) as bar:
        manager.add_detector(_FrameCounter(bar))
        manager.detect_scenes(video)
    # start_in_scene: a video without a cut is one shot, not none.
    scenes = manager.get_scene_list(start_in_scene=True)
    return [[start.seconds, end.seconds] for start, end in scenes]


def open_video(job: VideoJob, cfg: ShotsConfig) -> scenedetect.VideoStream:
    """PySceneDetect's reader of the played stream, with the backend `shot_backend` picks."""
    streams = video_stream_indices(job.path)
    backend = shot_backend(job, cfg, streams)
    try:
        if backend == "opencv":
            return scenedetect.open_video(str(job.path), backend="opencv")
        return PlayedStreamAv(job.path, streams[0])
    except scenedetect.VideoOpenFailure as e:
        raise DataError(f"{job.path}: PySceneDetect cannot open the video ({e})") from None


def shot_backend(job: VideoJob, cfg: ShotsConfig, streams: tuple[int, int] | None = None) -> str:
    """PySceneDetect's backend for the video: `shots.backend`, with auto resolved to pyav when OpenCV would read
    another stream than the played one or the first frame is flagged interlaced, else opencv. Raises
    OpenCvStreamError for opencv when it would read another stream. `streams`: `video.video_stream_indices` of
    the video, where the caller has them already."""
    played, first = streams or video_stream_indices(job.path)
    if cfg.backend == "opencv" and played != first:
        raise OpenCvStreamError(
            f"{job.path}: shots.backend opencv reads the first video stream (#{first}), not the one a player plays "
            f"(#{played}); use shots.backend auto or pyav"
        )
    if cfg.backend != "auto":
        return cfg.backend
    return "pyav" if played != first or first_frame_interlaced(job.path) else "opencv"


class PlayedStreamAv(VideoStreamAv):
    """PySceneDetect's PyAV backend on the stream of index `index`, the one a player plays (`video.played_stream`).
    Its own reads the first video stream, named in two places, both replaced here: the stream it asks for times
    and sizes (`_video_stream`), and the decoder that `read` makes with `decode(video=0)`, swapped for one of
    this stream before it decodes anything (a decoder is a generator: it starts on its first `next`)."""

    def __init__(self, path: Path, index: int) -> None:
        self._index = index  # before VideoStreamAv's constructor, which reads the stream
        # suppress_output: FFmpeg's log stays as PyAV leaves it, silent (PySceneDetect's default would restore
        # FFmpeg's own, which prints on stderr for the rest of the process). Its deadlock caveat is for threading.
        super().__init__(str(path), suppress_output=True)

    @property
    def _video_stream(self):
        return self._container.streams[self._index]

    @property
    def _decoder(self):
        return self.__dict__.get("_played_decoder")

    @_decoder.setter
    def _decoder(self, decoder) -> None:
        if decoder is not None:
            decoder.close()
            decoder = self._container.decode(self._video_stream)
        self.__dict__["_played_decoder"] = decoder


class _FrameCounter(scenedetect.SceneDetector):
    """Finds no cut: moves the progress bar on by each frame PySceneDetect reads, whatever its backend."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def process_frame(self, timecode, frame_img) -> list:
        self.bar.update()
        return []


def make_detector(cfg: ShotsConfig) -> scenedetect.SceneDetector:
    """The configured PySceneDetect detector, its threshold set when the config gives one."""
    kwargs: dict = {"min_scene_len": float(cfg.min_scene_len)}
    if cfg.threshold is not None:
        kwargs["adaptive_threshold" if cfg.detector == "adaptive" else "threshold"] = cfg.threshold
    return _DETECTORS[cfg.detector](**kwargs)
