"""Stage 3, keyframe extraction (appendix A.1): one keyframe per shot, by sharpness and motion.

Every frame is scored on its luma downscaled to `keyframes.analysis_width`, interlaced frames deinterlaced
(`keyframes.deinterlace`; combing scores as sharpness, and the stored keyframes would show it):
- sharpness, the variance of the Laplacian (higher = sharper);
- motion, the mean optical-flow magnitude (DIS, at half that width) to its neighbours in the shot, as a
  share of the frame width per frame (lower = steadier, less motion blur).
The paper ranks frames by both and keeps "the clearest and most distinct"; here the keyframe is the frame
with the lowest `sharpness_weight * sharpness rank + motion_weight * motion rank` (ranks scaled to [0, 1],
ties broken towards the sharper frame), among the frames at least `min_relative_sharpness` as sharp as the
shot's sharpest, so a blurred frame is never chosen because it happens to be still. Only the chosen frames
are then decoded again at full size.

Unit: keyframes (one per shot; a shot is never dropped here, the quality stage filters). A video that fails
to decode is dropped as undecodable, and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from dreamshot.prepare.config import KeyframeConfig, PrepareConfig
from dreamshot.prepare.files import save_png
from dreamshot.prepare.stage import UNDECODABLE, StageResult, VideoJob, unreadable
from dreamshot.prepare.video import decode_luma, read_frames
from dreamshot.utils.errors import DataError

UNIT = "keyframes"


@dataclass
class FrameScores:
    """Per-frame scores of a whole video, frame i at index i. `flow[i]` is the motion from frame i-1 to i
    (flow[0] = 0); `times` are the presentation times in seconds (to place the shots), `keys` the I-frame
    indices and `pts` the timestamps (to decode frames again); `interlaced`: whether any frame was flagged
    interlaced."""

    sharpness: np.ndarray
    contrast: np.ndarray
    flow: np.ndarray
    times: np.ndarray
    pts: list[int | None]
    keys: list[int]
    interlaced: bool = False


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    try:
        scores = score_frames(job, cfg.keyframes, inputs["curation"]["frames"])
        shots = frame_ranges(scores.times, inputs["shots"]["shots"])
        chosen = [choose_keyframe(scores, start, end, cfg.keyframes) for start, end in shots]
        images = read_frames(job.path, chosen, scores.pts, scores.keys, full_size_deinterlace(scores, cfg.keyframes))
    except DataError as e:  # a video that fails mid-stream (a broken download) is dropped, not the run
        return unreadable(e, UNDECODABLE)
    keyframes = []
    for number, frame in enumerate(chosen):
        path = job.output("frames", f"shot{number:04d}_f{frame:06d}.png")
        save_png(images[frame], path)
        keyframes.append(
            {
                "shot": number,
                "frame": frame,
                "time": float(scores.times[frame]),
                "sharpness": float(scores.sharpness[frame]),
                "contrast": float(scores.contrast[frame]),
                "motion": float(shot_motion(scores.flow, *shots[number])[frame - shots[number][0]]),
                "image": path.relative_to(job.out_dir).as_posix(),
            }
        )
    return StageResult({"keyframes": keyframes}, kept=len(keyframes), files=[kf["image"] for kf in keyframes])


def score_frames(job: VideoJob, cfg: KeyframeConfig, total: int | None = None) -> FrameScores:
    """One decoding pass over the video: sharpness, contrast and flow of every frame (`total`: the frame count
    the container gives, for the progress bar)."""
    flow_meter = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    sharp, contrast, flow, times, pts, keys = [], [], [], [], [], []
    previous, interlaced = None, False
    frames = decode_luma(job.path, cfg.analysis_width, cfg.deinterlace)
    bar = tqdm(frames, desc=f"  {job.id}", total=total, unit="frame", leave=False, disable=not job.progress)
    for frame in bar:
        sharp.append(sharpness(frame.luma))
        contrast.append(float(frame.luma.std()))
        small = cv2.resize(frame.luma, (max(frame.luma.shape[1] // 2, 8), max(frame.luma.shape[0] // 2, 8)))
        flow.append(0.0 if previous is None else flow_magnitude(flow_meter, previous, small))
        previous = small
        times.append(frame.time)
        pts.append(frame.pts)
        interlaced |= frame.interlaced
        if frame.key:
            keys.append(frame.index)
    return FrameScores(np.array(sharp), np.array(contrast), np.array(flow), np.array(times), pts, keys, interlaced)


def full_size_deinterlace(scores: FrameScores, cfg: KeyframeConfig) -> str:
    """The deinterlace mode of the full-size pass: the scoring pass's, except `never` for a video none of whose
    frames was flagged interlaced under `auto`, where the filter changes no frame. The filter's pass also decodes
    the frame before each target, which for a target on an I-frame means the whole group of pictures before it
    (the sharpest frame of a shot is often its I-frame, coded best)."""
    return "never" if cfg.deinterlace == "auto" and not scores.interlaced else cfg.deinterlace


def frame_ranges(times: np.ndarray, shots: list[list[float]]) -> list[tuple[int, int]]:
    """The [start, end) frame indices of shots given as [start, end) seconds (stage 2): the frames whose
    presentation time falls in the shot. Shots that hold no decoded frame (PySceneDetect may count past the
    last frame the decoder returns) are left out."""
    # PySceneDetect's times are its backend's timestamps, to the microsecond; frames are >= 2 ms apart even at
    # 500 fps, so 1 ms places a boundary on its frame whatever the rounding.
    tolerance = 1e-3
    ranges = [
        tuple(int(i) for i in np.searchsorted(times, [start - tolerance, end - tolerance])) for start, end in shots
    ]
    return [(start, end) for start, end in ranges if start < end]


def sharpness(luma: np.ndarray) -> float:
    """Variance of the Laplacian of a (h, w) uint8 image."""
    return float(cv2.Laplacian(luma, cv2.CV_32F).var())


def flow_magnitude(meter: cv2.DISOpticalFlow, previous: np.ndarray, current: np.ndarray) -> float:
    """Mean optical-flow length from `previous` to `current` ((h, w) uint8), as a share of the width."""
    flow = meter.calc(previous, current, None)
    return float(np.hypot(flow[..., 0], flow[..., 1]).mean() / current.shape[1])


def shot_motion(flow: np.ndarray, start: int, end: int) -> np.ndarray:
    """Motion of each frame of the shot [start, end): the mean of its flows to the previous and next frame
    inside the shot (the flow across the cut is not motion). Shape (end - start,)."""
    inside = flow[start + 1 : end]  # flow between frames i-1 and i, for i in start+1 .. end-1
    before = np.concatenate([[np.nan], inside])
    after = np.concatenate([inside, [np.nan]])
    both = np.stack([before, after])
    counts = np.isfinite(both).sum(axis=0)
    return np.where(counts > 0, np.nansum(both, axis=0) / np.maximum(counts, 1), 0.0)


def choose_keyframe(scores: FrameScores, start: int, end: int, cfg: KeyframeConfig) -> int:
    """The frame index of the shot [start, end) with the best combined rank (see the module docstring)."""
    sharp = scores.sharpness[start:end]
    candidates = np.flatnonzero(sharp >= cfg.min_relative_sharpness * sharp.max())
    motion = shot_motion(scores.flow, start, end)[candidates]
    sharp_rank = _scaled_rank(-sharp[candidates])
    # Quantised: motions in one step of the tolerance tie, so noise in a steady camera move does not rank frames.
    steps = np.floor(motion / cfg.motion_tolerance) if cfg.motion_tolerance > 0 else motion
    motion_rank = _scaled_rank(steps)
    combined = cfg.sharpness_weight * sharp_rank + cfg.motion_weight * motion_rank
    best = np.lexsort((-sharp[candidates], combined))[0]
    return start + int(candidates[best])


def _scaled_rank(values: np.ndarray) -> np.ndarray:
    """Ranks of `values` (smallest first, ties averaged) scaled to [0, 1]."""
    if len(values) < 2:
        return np.zeros(len(values))
    return (rankdata(values) - 1) / (len(values) - 1)
