"""Reading videos with PyAV: container metadata, a fast luma pass for scoring, and exact frames at full size.

Frames are numbered in presentation order from 0, as PySceneDetect numbers them. The scoring pass reads the
decoder's luma plane directly (no colour conversion) and downscales it with OpenCV; the full-size pass
decodes only what the chosen frames need, seeking to the last keyframe (I-frame) before a target when that
skips decoding, and shows them as a player does (square pixels, the container's display rotation and mirror,
HDR tone-mapped to SDR).

Every pass reads the stream a player plays (`played_stream`), not the file's first video stream, which may be
cover art or a thumbnail.

Both passes see interlaced frames (DVD, broadcast TV, camcorders) deinterlaced (`deinterlace`): the two fields
of a moving picture, taken 1/50 or 1/60 s apart, comb every edge, which scores as sharpness and would be
stored in the keyframes. FFmpeg's bwdif runs in frame mode, one frame out per frame in, and a frame keeps its
decoder's index and timestamp, so the shots map onto the same frames either way.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.stream import Disposition

from dreamshot.prepare.hdr import DEFAULT_PEAK, hdr_to_sdr
from dreamshot.utils.errors import DataError

# Container metadata keys that may carry a release or recording date.
DATE_KEYS = ("date", "creation_time", "year", "DATE", "YEAR")
# Pixel formats whose first plane is 8-bit luma, read without conversion (others go through swscale).
_EIGHT_BIT_LUMA = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "gray"}
_YEAR = re.compile(r"\b(1[89]\d\d|2\d\d\d)\b")
# bwdif's settings per `keyframes.deinterlace` mode (`never` builds no filter). send_frame: one frame per frame
# (not one per field); parity auto: each frame's field order flag; deint: which frames it changes (the others
# pass through untouched): those flagged interlaced, or all, for footage whose flags say progressive wrongly.
_BWDIF = {"auto": "mode=send_frame:parity=auto:deint=interlaced", "always": "mode=send_frame:parity=auto:deint=all"}
# FFmpeg's HDR transfer characteristics (AVColorTransferCharacteristic): SMPTE ST 2084 (PQ), ARIB STD-B67 (HLG).
_HDR_TRANSFERS = {16: "pq", 18: "hlg"}
_BT2020_PRIMARIES = 9  # AVCOL_PRI_BT2020
# Dispositions of a video stream that holds stills, not the video: cover art, thumbnails.
_STILLS = Disposition.attached_pic | Disposition.timed_thumbnails


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (nothing decoded)."""

    width: int
    height: int
    fps: float
    frames: int
    duration: float
    bitrate_kbps: float | None
    year: int | None


@dataclass(frozen=True)
class LumaFrame:
    """One decoded frame of the scoring pass: its index, timestamp, presentation time in seconds from the
    stream's start, whether it is an I-frame, whether the decoder flagged it interlaced, and its luma
    downscaled, (h, w) uint8."""

    index: int
    pts: int | None
    time: float
    key: bool
    interlaced: bool
    luma: np.ndarray


def probe(path: Path) -> VideoInfo:
    """Metadata of the played video stream (`played_stream`). Raises DataError when the file is not a readable
    video."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        duration = _duration(container, stream)
        frames = stream.frames or round(duration * rate)
        bitrate = container.bit_rate or stream.bit_rate
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=rate,
            frames=int(frames),
            duration=duration,
            bitrate_kbps=bitrate / 1000 if bitrate else None,
            year=_year({**container.metadata, **stream.metadata}),
        )


def video_stream_indices(path: Path) -> tuple[int, int]:
    """The container's indices of the stream a player plays (`played_stream`) and of the first video stream."""
    with _open(path) as container:
        return _video_stream(container, path).index, container.streams.video[0].index


def first_frame_interlaced(path: Path) -> bool:
    """Whether the first decoded frame is flagged interlaced (False for a video without a decodable frame)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        return next((bool(frame.interlaced_frame) for frame in _frames(container, stream, path)), False)


def decode_luma(path: Path, width: int, deinterlace: str) -> Iterator[LumaFrame]:
    """Every frame's luma, downscaled to `width` (never upscaled), in presentation order; interlaced frames
    deinterlaced as the mode `deinterlace` (auto | always | never) says."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        # Frame threading: the decoder works ahead on the other core while a frame is scored.
        stream.thread_type = "AUTO"
        start, rate = stream.start_time or 0, float(stream.average_rate or stream.guessed_rate or 1)
        for index, (frame, picture) in enumerate(_pictures(container, stream, path, deinterlace)):
            # From the stream's start, as PySceneDetect's backends count; a frame without a timestamp is placed
            # at the average rate.
            time = index / rate if frame.pts is None else float((frame.pts - start) * stream.time_base)
            yield LumaFrame(
                index, frame.pts, time, frame.key_frame, bool(frame.interlaced_frame), _luma(picture, width)
            )


def read_frames(
    path: Path, wanted: list[int], pts: list[int | None], keys: list[int], deinterlace: str
) -> dict[int, np.ndarray]:
    """Full-size RGB frames (H, W, 3) uint8 of the frame indices `wanted`, upright (`upright`), deinterlaced
    as in the scoring pass.

    `pts` (every frame's timestamp) and `keys` (indices of the I-frames, sorted) come from the scoring pass.
    Without timestamps the video is decoded from the start, counting frames.
    """
    seekable = bool(pts) and all(p is not None for p in pts)
    index_of = {p: i for i, p in enumerate(pts)} if seekable else None
    found: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        peak = static_peak(path) if stream.codec_context.color_trc in _HDR_TRANSFERS else None
        # The deinterlacer makes a frame from its neighbours too: the one before it is decoded as well (the next
        # one always is), so that it comes out as in the scoring pass.
        before = 0 if deinterlace == "never" else 1
        frames, position = None, 0  # position: index of the next frame the decoder returns
        for target in sorted(set(wanted)):
            first = target - before
            start = keys[bisect.bisect_right(keys, first) - 1] if seekable and keys and keys[0] <= first else 0
            # Seek only where it skips frames: decoding on from `position` reaches the target anyway.
            if frames is None or start > position:
                if start > position:
                    container.seek(pts[start], stream=stream, backward=True)
                frames = _pictures(container, stream, path, deinterlace)
            frame, position = _decode_until(frames, target, index_of, position, path)
            found[target] = upright(frame, stream.sample_aspect_ratio, peak)
    return found


def _decode_until(frames, target: int, index_of: dict | None, position: int, path: Path) -> tuple[av.VideoFrame, int]:
    """The picture of frame `target` from `frames` (`_pictures`), and the index of the frame after it."""
    for frame, picture in frames:
        index = position if index_of is None else index_of.get(frame.pts)
        if index is None:
            continue
        position = index + 1
        if index == target:
            return picture, position
        if index > target:
            break
    raise DataError(f"{path}: frame {target}, seen by the scoring pass, could not be decoded again")


def upright(frame: av.VideoFrame, sample_aspect: Fraction | None, peak: float | None) -> np.ndarray:
    """The frame as RGB (H, W, 3) uint8 as a player shows it: with square pixels (anamorphic DV or DVD footage
    stores wide frames squeezed, with the stream's `sample_aspect` ratio to stretch them by), then turned and
    mirrored by the display matrix of its container (`orientation`: a phone stores a portrait video as landscape
    frames and a rotation, and a front camera's as mirrored); an HDR frame tone-mapped to SDR (`_rgb`, `peak`:
    its video's `static_peak`). Only the full-size frames are corrected: sharpness and motion are measured on the
    frames as stored."""
    rgb = _rgb(frame, peak)
    if sample_aspect and sample_aspect != 1:
        width = max(1, round(rgb.shape[1] * sample_aspect))
        rgb = cv2.resize(
            rgb, (width, rgb.shape[0]), interpolation=cv2.INTER_AREA if width < rgb.shape[1] else cv2.INTER_CUBIC
        )
    matrix = _side_data(frame, SideDataType.DISPLAYMATRIX)  # the decoder copies the stream's onto every frame
    turns, mirrored = orientation(None if matrix is None else np.frombuffer(matrix, np.int32))
    rgb = np.rot90(rgb, turns)
    return np.ascontiguousarray(rgb[:, ::-1] if mirrored else rgb)


def _rgb(frame: av.VideoFrame, peak: float | None) -> np.ndarray:
    """The frame as RGB (H, W, 3) uint8; a PQ or HLG (HDR) one decoded to 16 bits and tone-mapped to SDR BT.709
    (`hdr.hdr_to_sdr`) with the peak light `peak` in cd/m² (None: `hdr.DEFAULT_PEAK` of its transfer)."""
    transfer = _HDR_TRANSFERS.get(frame.color_trc)
    if transfer is None:
        return frame.to_ndarray(format="rgb24")
    # The frame's own range: swscale takes an unspecified one for limited, and phones also record full range.
    signal = frame.to_ndarray(format="rgb48le", src_color_range=frame.color_range) / np.float32(65535)
    bt2020 = frame.color_primaries == _BT2020_PRIMARIES
    return hdr_to_sdr(signal, transfer, peak or DEFAULT_PEAK[transfer], bt2020)


def reading_corrections(path: Path) -> tuple[str, ...]:
    """How this video's reading differs from `dreamshot prepare`'s state format 2, which read the first video
    stream, ignored a display matrix's mirror and stored HDR frames untouched: the played stream's index when it
    is not the first video stream, "mirrored", the HDR transfer. Empty for a video none of these concern (and
    for one that cannot be read, which stage 1 drops), so that in the state keys a folder prepared before these
    corrections redoes the stages of the videos they change, and only theirs."""
    try:
        with _open(path) as container:
            stream = _video_stream(container, path)
            first = next(_frames(container, stream, path), None)
            played, first_video = stream.index, container.streams.video[0].index
    except DataError:
        return ()
    corrections = () if played == first_video else (f"stream {played}",)
    if first is not None:
        matrix = _side_data(first, SideDataType.DISPLAYMATRIX)
        if matrix is not None and orientation(np.frombuffer(matrix, np.int32))[1]:
            corrections += ("mirrored",)
        if first.color_trc in _HDR_TRANSFERS:
            corrections += (_HDR_TRANSFERS[first.color_trc],)
    return corrections


def static_peak(path: Path) -> float | None:
    """The peak light in cd/m² of the video's HDR static metadata (`signal_peak`), read from its first frame:
    H.264 and HEVC carry it with some frames only, the first among them (as the stream's own side data does)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        first = next(_frames(container, stream, path), None)
        return None if first is None else signal_peak(first)


def signal_peak(frame: av.VideoFrame) -> float | None:
    """The frame's peak light in cd/m², as FFmpeg's tonemap reads it: the content light level's MaxCLL, else the
    mastering display's peak luminance, else None (no metadata)."""
    light = _side_data(frame, SideDataType.CONTENT_LIGHT_LEVEL)
    if light and (max_cll := int(np.frombuffer(light, np.uint32)[0])):
        return float(max_cll)
    mastering = _side_data(frame, SideDataType.MASTERING_DISPLAY_METADATA)
    if mastering:
        # AVMasteringDisplayMetadata: 8 rationals (primaries, white point), min and max luminance, then the flags
        # has_primaries and has_luminance, all int32.
        fields = np.frombuffer(mastering, np.int32)
        if fields[21] and fields[19]:
            return float(fields[18] / fields[19])
    return None


def orientation(matrix: np.ndarray | None) -> tuple[int, bool]:
    """How a player shows frames under FFmpeg's display matrix `matrix` (9 int32, None: none): turned `turns`
    quarter turns counter-clockwise (np.rot90's sense), then mirrored left to right when `mirrored`. A matrix
    whose 2x2 part has a negative determinant mirrors; with its first column negated it is a pure rotation,
    read as FFmpeg's av_display_rotation_get does. This is FFmpeg's own autorotation (fftools: hflip, vflip and
    transpose filters) for every multiple of 90 degrees; other angles are rounded to the nearest one."""
    if matrix is None:
        return 0, False
    a, b, c, d = (float(v) for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    mirrored = a * d - b * c < 0
    if mirrored:
        a, c = -a, -c
    # av_display_rotation_get: the angle counter-clockwise of the columns scaled to unit length.
    angle = -np.degrees(np.arctan2(b / np.hypot(b, d), a / np.hypot(a, c)))
    return round(angle / 90) % 4, mirrored


def _side_data(frame: av.VideoFrame, kind: SideDataType) -> bytes | None:
    """The bytes of the frame's side data of type `kind`, or None."""
    return next((bytes(data) for data in frame.side_data if data.type == kind), None)


def _luma(frame: av.VideoFrame, width: int) -> np.ndarray:
    plane = frame.planes[0]
    if frame.format.name in _EIGHT_BIT_LUMA:
        # Y plane rows are `line_size` bytes apart; the first `width` bytes of each are pixels.
        luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    else:
        luma = frame.to_ndarray(format="gray")
    if luma.shape[1] <= width:
        return np.ascontiguousarray(luma)
    height = max(1, round(luma.shape[0] * width / luma.shape[1]))
    return cv2.resize(luma, (width, height), interpolation=cv2.INTER_AREA)


def _open(path: Path):
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        # FFmpeg's text without its errno and the path, which the message already starts with.
        raise DataError(f"{path}: not a readable video ({getattr(e, 'strerror', None) or e})") from None


def _video_stream(container, path: Path):
    return played_stream(container.streams.video, path)


def played_stream(streams, path: Path):
    """The video stream of `streams` a player plays: not cover art or thumbnails (dispositions attached_pic and
    timed_thumbnails); of the others, one flagged default (a container's choice) before one that is not, then
    the most pixels, then the most frames the container counts, then the first. Raises DataError when there is
    none."""
    videos = [stream for stream in streams if not stream.disposition & _STILLS]
    if not videos:
        kind = "video stream other than cover art" if streams else "video stream"
        raise DataError(f"{path}: has no {kind}")
    return max(
        videos,
        key=lambda s: (
            bool(s.disposition & Disposition.default),
            s.codec_context.width * s.codec_context.height,
            s.frames,
            -s.index,
        ),
    )


def _frames(container, stream, path: Path) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise DataError(f"{path}: decoding failed ({e})") from None


def _pictures(container, stream, path: Path, deinterlace: str) -> Iterator[tuple[av.VideoFrame, av.VideoFrame]]:
    """Every decoded frame with its picture: the frame deinterlaced (`_BWDIF[deinterlace]`), or itself under
    `never`. The frame gives the index, timestamp and I-frame flag: the filter's output counts time in half
    frames, and its first frame waits for the second."""
    frames = _frames(container, stream, path)
    if deinterlace == "never":
        yield from ((frame, frame) for frame in frames)
        return
    graph, waiting = None, deque()
    try:
        for frame in frames:
            if graph is None:
                graph = _deinterlacer(frame, stream, _BWDIF[deinterlace])
            waiting.append(frame)
            graph.vpush(frame)
            yield from _filtered(graph, waiting)
        if graph is not None:
            graph.vpush(None)  # end of stream: the last frame has no next one to wait for
            yield from _filtered(graph, waiting)
    except av.FFmpegError as e:
        raise DataError(f"{path}: deinterlacing failed ({e})") from None


def _deinterlacer(frame: av.VideoFrame, stream, options: str) -> av.filter.Graph:
    """A bwdif filter graph for frames like `frame` (its size and pixel format)."""
    graph = av.filter.Graph()
    source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=stream.time_base)
    graph.link_nodes(source, graph.add("bwdif", options), graph.add("buffersink")).configure()
    return graph


def _filtered(graph: av.filter.Graph, waiting: deque) -> Iterator[tuple[av.VideoFrame, av.VideoFrame]]:
    """The pictures the filter has ready, each with its frame, the oldest of `waiting` (one out per one in)."""
    while True:
        try:
            picture = graph.vpull()
        except (av.BlockingIOError, av.EOFError):
            return
        yield waiting.popleft(), picture


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def _year(metadata: dict[str, str]) -> int | None:
    for key in DATE_KEYS:
        match = _YEAR.search(metadata.get(key, ""))
        if match:
            return int(match.group(1))
    return None
