"""Toy-world videos with known structure, for the tests and the benchmark of `dreamshot prepare`.

A video strings together the shots of a few toy storyboard groups (one scene each, scenes all different),
group after group. Every shot is a hard cut, the camera pans sideways at a constant speed inside a shot
(pausing after chosen frames), and chosen frames are blurred with a Gaussian. A video can be interlaced, as
DVD, TV and camcorder footage is: its odd rows are filmed half a frame later than its even rows, so a pan
combs every edge. A video can carry cover art, as its file's first stream. The returned `ToyVideo` holds the
truth: cut frames, the scene of every shot, and which frames are blurred.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.stream import Disposition

from dreamshot.data.toyworld import SCENES, GroupPlan, ShotPlan, plan_group, render_shot

MILLISECOND = Fraction(1, 1000)


@dataclass(frozen=True)
class ToyVideo:
    """Where a toy video is and what is in it. Frame ranges are [start, end) indices."""

    path: Path
    fps: int
    shots: list[tuple[int, int]]
    scenes: list[int]
    blurred: dict[int, float]

    @property
    def cuts(self) -> list[int]:
        """First frame of every shot after the first."""
        return [start for start, _ in self.shots[1:]]


def scene_groups(seed: int, count: int, max_shots: int = 4) -> list[int]:
    """Indices of the first `count` toy groups with pairwise different scenes and at least two cut shots."""
    chosen, seen = [], set()
    index = 0
    while len(chosen) < count:
        plan = plan_group(seed, index, 2, max_shots, 2)
        if plan.scene not in seen and len(cut_shots(plan)) >= 2:
            chosen.append(index)
            seen.add(plan.scene)
        index += 1
        if index > 100 * len(SCENES):
            raise ValueError(f"toy world seed {seed} has fewer than {count} different scenes")
    return chosen


def cut_shots(plan: GroupPlan) -> list[ShotPlan]:
    """The group's shots, leaving out any that keeps the framing of the shot before it: a cut that changes
    little but the place of a character is not one a shot detector is expected to see."""
    kept: list[ShotPlan] = []
    for shot in plan.shots:
        if not kept or shot.framing != kept[-1].framing:
            kept.append(shot)
    return kept


def render_toy_video(
    path: str | os.PathLike,
    scenes: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (96, 160),
    fps: int = 8,
    shot_frames: int = 12,
    pan: float = 1.0,
    blur: dict[int, float] | None = None,
    grain: float = 0.0,
    max_shots: int = 4,
    metadata: dict[str, str] | None = None,
    crf: int = 18,
    frame_times: list[float] | None = None,
    rotation: int = 0,
    mirror: bool = False,
    still: set[int] | frozenset[int] = frozenset(),
    interlaced: bool = False,
    flag_interlaced: bool = True,
    cover_art: bool = False,
) -> ToyVideo:
    """Write a toy video (H.264 mp4) and return its truth.

    `pan`: camera speed in pixels per frame (direction alternates by shot); `blur`: frame index -> Gaussian
    sigma in pixels; `grain`: standard deviation of per-frame noise (makes the stream as costly to decode
    as filmed footage); `metadata`: container tags (e.g. {"creation_time": "2012-01-01"}); `crf`: x264's
    quality (higher = smaller file); `frame_times`: the presentation time in seconds of every frame, for a
    variable-frame-rate video (None: frame i at i / fps; stored to the millisecond); `rotation`: the display
    rotation in the container, in degrees counter-clockwise, as a phone stores a portrait video (the frames
    are encoded as rendered, so a player shows them turned); `mirror`: the display matrix also mirrors them left
    to right after the rotation, as a phone stores its front camera's video; `still`: frames after which the
    camera stays put for a frame (an interlaced frame of them has no combing); `interlaced`: each frame is two
    fields, top field first: the even rows at its time, the odd rows half a frame later (the camera halfway to
    the next frame), blurred each on its own, as a camera exposes them; `flag_interlaced`: the encoder codes and
    flags such frames interlaced (x264's MBAFF, top field first), else progressive, as footage whose flags lie;
    `cover_art`: the file also holds a flat magenta picture twice the frames' size as an attached picture (an
    MJPEG video stream with the attached_pic disposition), its first stream.
    """
    height, width = size
    blur = dict(blur or {})
    rng = np.random.default_rng(seed)
    frames, shots, scene_of = [], [], []
    for scene, group in enumerate(scene_groups(seed, scenes, max_shots)):
        plan = plan_group(seed, group, 2, max_shots, 2)
        for number, shot in enumerate(cut_shots(plan)):
            first = len(frames)
            # Camera position (pixels panned) at each frame of the shot and at the frame after its last.
            places = np.concatenate(
                [[0.0], np.cumsum([0.0 if first + i in still else pan for i in range(shot_frames)])]
            )
            travel = int(np.ceil(places[-1]))
            canvas = render_shot(plan, shot, height, width + travel)[0]
            direction = 1 if number % 2 == 0 else -1
            shots.append((first, first + shot_frames))
            scene_of.append(scene)
            for i in range(shot_frames):
                offsets = [places[i], (places[i] + places[i + 1]) / 2] if interlaced else [places[i]]
                frames.append([canvas[:, _column(p, direction, travel) :][:, :width] for p in offsets])
    if frame_times is not None and len(frame_times) != len(frames):
        raise ValueError(f"frame_times has {len(frame_times)} times for {len(frames)} frames")
    flags = interlaced and flag_interlaced
    display = (rotation, mirror)
    with _writer(Path(path), size, fps, metadata, crf, frame_times is not None, display, flags, cover_art) as write:
        for index, fields in enumerate(frames):
            write(
                _degrade(fields, blur.get(index, 0.0), grain, rng),
                None if frame_times is None else frame_times[index],
            )
    if cover_art:
        _cover_art_first(Path(path))
    return ToyVideo(Path(path), fps, shots, scene_of, blur)


def _column(place: float, direction: int, travel: int) -> int:
    """The canvas column at the frame's left edge, the camera `place` pixels into its pan."""
    return round(place) if direction > 0 else travel - round(place)


def _degrade(fields: list[np.ndarray], sigma: float, grain: float, rng: np.random.Generator) -> np.ndarray:
    """The frame of its views (one, or the two fields' whole views), blurred and grained."""
    if sigma > 0:
        fields = [cv2.GaussianBlur(field, (0, 0), sigma) for field in fields]
    frame = fields[0].copy()
    if len(fields) == 2:
        frame[1::2] = fields[1][1::2]
    if grain > 0:
        noise = rng.normal(0, grain, frame.shape[:2])[..., None]
        frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def _cover_art_first(path: Path) -> None:
    """Make the mp4's cover art its first stream. FFmpeg's muxer stores it in the movie's user data after the
    tracks, and its demuxer numbers streams in the order it reads them, so the user data box is moved before
    the first track box. The movie box follows the media data, whose offsets therefore stay as they are."""
    data = path.read_bytes()
    parts = []
    for kind, box in _boxes(data):
        if kind == b"moov":
            children = _boxes(box[8:])
            tracks = [i for i, (k, _) in enumerate(children) if k == b"trak"]
            user = [child for child in children if child[0] == b"udta"]
            rest = [child for child in children if child[0] != b"udta"]
            rest[tracks[0] : tracks[0]] = user
            box = box[:8] + b"".join(child for _, child in rest)
        parts.append(box)
    path.write_bytes(b"".join(parts))


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ISO media boxes `data` is made of, each (type, whole box); 32-bit sizes, as FFmpeg writes small files."""
    boxes, start = [], 0
    while start < len(data):
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        boxes.append((kind, data[start : start + size]))
        start += size
    return boxes


class _writer:
    """Context manager: an H.264 mp4 writer; calling it encodes one RGB frame (H, W, 3) uint8, at a given time
    in seconds when `timed` (millisecond timestamps), else at the next 1 / fps; `display`: the display matrix's
    rotation (degrees counter-clockwise) and mirror; coded and flagged interlaced when `interlaced`; with a
    cover picture when `cover_art`."""

    def __init__(
        self,
        path: Path,
        size: tuple[int, int],
        fps: int,
        metadata: dict[str, str] | None,
        crf: int,
        timed: bool,
        display: tuple[int, bool],
        interlaced: bool,
        cover_art: bool,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.container.metadata.update(metadata or {})
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.height, self.stream.width = size
        self.stream.pix_fmt = "yuv420p"
        if display != (0, False):
            self.stream.set_display_rotation(display[0], hflip=display[1])
        if timed:
            self.stream.time_base = self.stream.codec_context.time_base = MILLISECOND
        # A keyframe every 2 s, as web video has; quiet x264 (it prints a summary on stderr otherwise).
        options = {"preset": "ultrafast", "crf": str(crf), "g": str(2 * fps), "x264-params": "log-level=none"}
        if interlaced:
            # Interlaced coding and flags (ilme: motion estimation by field); field order: top first.
            options |= {"flags": "+ilme+ildct", "field_order": "tt"}
        self.stream.options = options
        if cover_art:
            self._write_cover(size)

    def _write_cover(self, size: tuple[int, int]) -> None:
        """One MJPEG picture, flat magenta, twice the frames' size (a rule by pixels alone would choose it)."""
        cover = self.container.add_stream("mjpeg", rate=1)
        cover.height, cover.width = 2 * size[0], 2 * size[1]
        cover.pix_fmt = "yuvj420p"
        cover.disposition = Disposition.attached_pic
        picture = np.zeros((cover.height, cover.width, 3), np.uint8)
        picture[..., 0] = picture[..., 2] = 255
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuvj420p")
        self.container.mux(cover.encode(frame) + cover.encode())

    def __enter__(self):
        return self

    def __call__(self, frame: np.ndarray, time: float | None) -> None:
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        if time is not None:
            video_frame.pts, video_frame.time_base = round(time * 1000), MILLISECOND
        self.container.mux(self.stream.encode(video_frame))

    def __exit__(self, *exc) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def toy_overrides() -> list[str]:
    """`dreamshot prepare` settings for toy videos: they are tiny (no resolution or bitrate floor), their
    shots are short, and their cuts within a scene change less than a film's (ContentDetector at 10, not 27)."""
    return [
        "curation.min_short_side=0",
        "curation.min_bitrate_kbps=0",
        "shots.threshold=10",
        "shots.min_scene_len=0.25",
        "shots.min_shot_seconds=0.5",
    ]
