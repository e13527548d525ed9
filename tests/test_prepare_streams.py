"""`dreamshot prepare` reads what a player shows: the stream it plays (not cover art), turned and mirrored by
the display matrix; and stage 2's progress bar."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from av.stream import Disposition

from dreamshot.prepare import keyframes, shots
from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.keyframes import score_frames
from dreamshot.prepare.pipeline import STATE_FORMAT, video_key
from dreamshot.prepare.shots import detect_shots, shot_backend
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.state import digest
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.prepare.video import orientation, played_stream, probe, read_frames, reading_corrections
from dreamshot.utils.errors import DataError

CFG = load_prepare_config(overrides=toy_overrides())
PATH = Path("clip.mkv")
NONE = Disposition(0)


def _stream(index, width, height, frames=0, disposition=NONE):
    return SimpleNamespace(
        index=index,
        disposition=disposition,
        frames=frames,
        codec_context=SimpleNamespace(width=width, height=height),
    )


def test_the_played_stream_is_not_cover_art_then_default_then_largest():
    cover = _stream(0, 1000, 1000, 1, Disposition.attached_pic | Disposition.default)
    small, large = _stream(1, 320, 180, 100), _stream(2, 1280, 720, 100)
    assert played_stream([cover, small, large], PATH) is large
    flagged = _stream(1, 320, 180, 100, Disposition.default)
    assert played_stream([cover, flagged, large], PATH) is flagged  # the container's choice first
    longer = _stream(3, 1280, 720, 200)
    assert played_stream([cover, large, longer], PATH) is longer
    assert played_stream([large, _stream(3, 1280, 720, 100)], PATH) is large  # a tie: the first
    with pytest.raises(DataError, match="clip.mkv: has no video stream other than cover art"):
        played_stream([cover], PATH)
    with pytest.raises(DataError, match="clip.mkv: has no video stream$"):
        played_stream([], PATH)


@pytest.fixture(scope="module")
def covered(tmp_path_factory):
    """A toy video whose file's first stream is its cover art (a magenta still twice the frames' size)."""
    return render_toy_video(tmp_path_factory.mktemp("v") / "covered.mp4", scenes=2, cover_art=True)


def test_a_video_with_cover_art_first_is_read_from_the_stream_a_player_plays(covered, tmp_path):
    info = probe(covered.path)
    assert (info.width, info.height, info.frames) == (160, 96, covered.shots[-1][1])
    job = VideoJob("covered", covered.path, tmp_path)
    assert shot_backend(job, CFG.shots) == "pyav"  # OpenCV reads the first video stream: the cover
    cuts = [cut / covered.fps for cut in covered.cuts]
    for backend in ("auto", "pyav"):
        found = detect_shots(job, replace(CFG.shots, backend=backend))
        assert [start for start, _ in found[1:]] == pytest.approx(cuts), backend
    inputs = {"curation": asdict(info)}
    inputs["shots"] = shots.run(job, inputs, CFG, None).data
    result = keyframes.run(job, inputs, CFG, None)
    assert result.kept == len(covered.shots)
    scores = score_frames(job, CFG.keyframes)
    assert len(scores.sharpness) == covered.shots[-1][1]
    frame = read_frames(covered.path, [5], scores.pts, scores.keys, "auto")[5]
    assert frame.shape == (96, 160, 3)
    magenta = np.array([255, 0, 255])
    assert np.abs(frame.astype(int) - magenta).sum(axis=-1).min() > 60  # no pixel of the cover


def _with_preview_first(video, path: Path) -> Path:
    """The toy video remuxed into an MKV after a small 3-frame preview stream, the video flagged default."""
    with av.open(str(video.path)) as source, av.open(str(path), "w") as out:
        preview = out.add_stream("libx264", rate=1, options={"x264-params": "log-level=none"})
        preview.width = preview.height = 32
        preview.pix_fmt, preview.disposition = "yuv420p", NONE
        main = out.add_stream_from_template(source.streams.video[0])
        main.disposition = Disposition.default
        for level in (0, 80, 160):
            out.mux(preview.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")))
        out.mux(preview.encode())
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:  # not the demuxer's flush packet
                packet.stream = main
                out.mux(packet)
    return path


def test_a_video_after_a_preview_stream_is_read_from_its_default_stream(tmp_path):
    video = render_toy_video(tmp_path / "plain.mp4", scenes=2)
    path = _with_preview_first(video, tmp_path / "preview.mkv")
    info = probe(path)
    assert (info.width, info.height) == (160, 96)
    job = VideoJob("preview", path, tmp_path)
    assert shot_backend(job, CFG.shots) == "pyav"
    found = detect_shots(job, CFG.shots)
    assert [start for start, _ in found[1:]] == pytest.approx([cut / video.fps for cut in video.cuts])


def test_opencv_backend_refuses_a_video_whose_first_video_stream_is_not_played(covered, tmp_path):
    cfg = load_prepare_config(overrides=[*toy_overrides(), "shots.backend=opencv"])
    job = VideoJob("covered", covered.path, tmp_path)
    result = shots.run(job, {"curation": asdict(probe(covered.path))}, cfg, None)
    assert result.kept == 0 and result.dropped == {shots.OPENCV_STREAM: 1}
    assert "reads the first video stream (#0), not the one a player plays (#1)" in result.data["error"]


def _anti_transpose(image):
    return image[::-1, ::-1].transpose(1, 0, 2)


# FFmpeg's autorotation (fftools/ffmpeg_filter.c) for each display matrix's 2x2 part (a, b, c, d) in 16.16:
# the filters it inserts, as array operations.
FFMPEG_AUTOROTATE = [
    ((1, 0, 0, 1), lambda a: a),
    ((0, -1, 1, 0), lambda a: np.rot90(a, 1)),  # transpose=cclock
    ((-1, 0, 0, -1), lambda a: a[::-1, ::-1]),  # hflip, vflip
    ((0, 1, -1, 0), lambda a: np.rot90(a, -1)),  # transpose=clock
    ((-1, 0, 0, 1), lambda a: a[:, ::-1]),  # hflip
    ((1, 0, 0, -1), lambda a: a[::-1]),  # vflip
    ((0, 1, 1, 0), lambda a: a.transpose(1, 0, 2)),  # transpose=cclock_flip
    ((0, -1, -1, 0), _anti_transpose),  # transpose=clock_flip
]


@pytest.mark.parametrize(("part", "ffmpeg"), FFMPEG_AUTOROTATE)
def test_orientation_shows_frames_as_ffmpeg_autorotates_them(part, ffmpeg):
    a, b, c, d = (v * 65536 for v in part)
    matrix = np.array([a, b, 0, c, d, 0, 0, 0, 1 << 30], np.int32)
    turns, mirrored = orientation(matrix)
    image = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    shown = np.rot90(image, turns)
    np.testing.assert_array_equal(shown[:, ::-1] if mirrored else shown, ffmpeg(image))
    assert orientation(None) == (0, False)


@pytest.mark.parametrize("rotation", [0, 90, 180, -90])
def test_a_mirrored_video_is_shown_mirrored_after_its_rotation(tmp_path, rotation):
    # A front camera's video: its display matrix turns it and mirrors it left to right. The frames are coded the
    # same as a plain video's, so the shown frames are the plain ones turned and mirrored, exactly.
    plain = render_toy_video(tmp_path / "plain.mp4", scenes=1)
    selfie = render_toy_video(tmp_path / "selfie.mp4", scenes=1, rotation=rotation, mirror=True)
    wanted = [0, 9]
    expected = {}
    for video in (plain, selfie):
        scores = score_frames(VideoJob("toy", video.path, tmp_path), CFG.keyframes)
        expected[video.path.stem] = read_frames(video.path, wanted, scores.pts, scores.keys, "auto")
    for index in wanted:
        turned = np.rot90(expected["plain"][index], round(rotation / 90))
        np.testing.assert_array_equal(expected["selfie"][index], turned[:, ::-1])


def test_shot_detection_shows_a_frame_progress_bar_only_when_asked(covered, tmp_path, capsys):
    # PySceneDetect reads a whole film: the stage's bar (one step per video) would stand still for minutes.
    frames = covered.shots[-1][1]
    detect_shots(VideoJob("toy", covered.path, tmp_path, progress=True), CFG.shots, total=frames)
    err = capsys.readouterr().err
    assert f"0/{frames} [" in err and "\n" not in err  # the bar clears itself when done (leave=False)
    detect_shots(VideoJob("toy", covered.path, tmp_path), CFG.shots, total=frames)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("options", "corrections"),
    [({}, ()), ({"rotation": 90}, ()), ({"mirror": True}, ("mirrored",)), ({"cover_art": True}, ("stream 1",))],
)
def test_only_videos_read_otherwise_than_under_state_format_2_get_new_state_keys(tmp_path, options, corrections):
    """A folder prepared before the played stream and the mirror were read keeps the stages of every video they do
    not concern (their keys are format 2's) and redoes those of the others."""
    path = tmp_path / "clip.mp4"
    render_toy_video(path, scenes=1, **options)
    assert reading_corrections(path) == corrections
    stat = path.stat()
    assert (video_key(path) == digest(STATE_FORMAT, stat.st_size, stat.st_mtime_ns)) == (not corrections)
