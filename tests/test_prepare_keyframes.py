"""Stages 2-3 of `dreamshot prepare` on toy videos with known cuts, camera motion and blurred frames."""

from __future__ import annotations

from dataclasses import asdict
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from dreamshot.prepare import keyframes, shots
from dreamshot.prepare.config import KeyframeConfig, load_prepare_config
from dreamshot.prepare.keyframes import FrameScores, choose_keyframe, score_frames, shot_motion
from dreamshot.prepare.shots import detect_shots
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.prepare.video import probe, read_frames

CFG = load_prepare_config(overrides=toy_overrides())


def _job(video, tmp_path) -> VideoJob:
    return VideoJob("toy", video.path, tmp_path)


def _shot_frames(shots):
    return [range(start, end) for start, end in shots]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """3 scenes; in every shot one frame is sharp and all others are blurred (sigma 1-3 px)."""
    rng = np.random.default_rng(1)
    layout = render_toy_video(tmp_path_factory.mktemp("v") / "layout.mp4", scenes=3)
    sharp = [int(rng.integers(start, end)) for start, end in layout.shots]
    blur = {f: float(rng.uniform(1.0, 3.0)) for shot in _shot_frames(layout.shots) for f in shot if f not in sharp}
    video = render_toy_video(tmp_path_factory.mktemp("v") / "graded.mp4", scenes=3, blur=blur)
    return video, sharp


def test_detected_cuts_match_the_known_cuts(graded, tmp_path):
    video, _ = graded
    shots = detect_shots(_job(video, tmp_path), CFG.shots)
    assert [start * video.fps for start, _ in shots[1:]] == pytest.approx(video.cuts)
    assert shots[-1][1] * video.fps == pytest.approx(video.shots[-1][1])


def test_keyframes_of_a_variable_frame_rate_video_are_the_sharp_frames_of_their_shots(graded, tmp_path):
    # The graded video's frames re-timed: the first half 1/4 s apart, the rest 1/20 s. PySceneDetect's frame
    # numbers are its times x the average rate, which are not the decoder's frame indices here.
    layout, sharp = graded
    count = layout.shots[-1][1]
    times = [0.25 * min(i, count // 2) + 0.05 * max(i - count // 2, 0) for i in range(count)]
    video = render_toy_video(tmp_path / "vfr.mp4", scenes=3, blur=layout.blurred, frame_times=times)
    job = _job(video, tmp_path)
    inputs = {"curation": asdict(probe(video.path))}
    inputs["shots"] = shots.run(job, inputs, CFG, None).data
    result = keyframes.run(job, inputs, CFG, None)
    assert [kf["frame"] for kf in result.data["keyframes"]] == sharp
    assert [kf["time"] for kf in result.data["keyframes"]] == pytest.approx([times[f] for f in sharp], abs=1e-3)


def test_the_sharpest_frame_of_each_shot_is_chosen(graded, tmp_path):
    video, sharp = graded
    scores = score_frames(_job(video, tmp_path), CFG.keyframes)
    assert len(scores.sharpness) == video.shots[-1][1]
    chosen = [choose_keyframe(scores, start, end, CFG.keyframes) for start, end in video.shots]
    assert chosen == sharp


def test_blurred_frames_are_never_keyframes(tmp_path):
    rng = np.random.default_rng(2)
    frames = 3 * 4 * 12  # more than the video has: every frame of it may be drawn
    blurred = {int(f): float(rng.uniform(1.0, 3.0)) for f in rng.choice(frames, frames // 3, replace=False)}
    video = render_toy_video(tmp_path / "pan.mp4", scenes=3, seed=3, pan=2.0, blur=blurred)
    scores = score_frames(_job(video, tmp_path), CFG.keyframes)
    chosen = [choose_keyframe(scores, start, end, CFG.keyframes) for start, end in video.shots]
    assert all(start <= f < end for f, (start, end) in zip(chosen, video.shots, strict=True))
    assert not set(chosen) & set(video.blurred)
    # The drawing blurred some frames of every shot, so the test could fail.
    assert all(set(shot) & set(video.blurred) for shot in _shot_frames(video.shots))


def test_full_size_frames_are_the_decoded_frames(graded, tmp_path):
    video, _ = graded
    scores = score_frames(_job(video, tmp_path), CFG.keyframes)
    with av.open(str(video.path)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    wanted = [3, 17, 18, 40, len(every) - 1]  # in several GOPs (a keyframe every 16 frames): seeks and runs on
    assert len(scores.keys) > 2
    frames = read_frames(video.path, wanted, scores.pts, scores.keys, "auto")
    assert sorted(frames) == wanted
    for index in wanted:
        np.testing.assert_array_equal(frames[index], every[index])


def _scores(sharpness, flow) -> FrameScores:
    n = len(sharpness)
    return FrameScores(
        np.array(sharpness, float), np.zeros(n), np.array(flow, float), np.arange(n) / 8, [None] * n, [0]
    )


def test_combined_rank_weighs_sharpness_and_motion():
    # Frames 1 and 3 are equally sharp; frame 3 is stiller. Frame 4 is still but blurred.
    scores = _scores([100, 200, 150, 200, 20], [0, 0.05, 0.05, 0.001, 0.001])
    cfg = KeyframeConfig(motion_tolerance=0.002)
    assert choose_keyframe(scores, 0, 5, cfg) == 3
    assert choose_keyframe(scores, 0, 5, KeyframeConfig(sharpness_weight=1.0, motion_weight=0.0)) == 1
    # Motion alone would pick the still frames 3 or 4; the relative-sharpness floor keeps 4 out.
    assert choose_keyframe(scores, 0, 5, KeyframeConfig(sharpness_weight=0.0, motion_weight=1.0)) == 3


def test_motion_within_the_tolerance_ties_and_sharpness_decides():
    scores = _scores([180, 200, 190], [0, 0.0105, 0.0104])
    assert choose_keyframe(scores, 0, 3, KeyframeConfig(sharpness_weight=0.5, motion_weight=0.5)) == 1


def test_motion_ignores_the_flow_across_a_cut():
    flow = np.array([0.0, 0.1, 0.3, 9.0, 0.2])  # flow[3] is the cut between frames 2 and 3
    np.testing.assert_allclose(shot_motion(flow, 0, 3), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(shot_motion(flow, 3, 5), [0.2, 0.2])
    np.testing.assert_allclose(shot_motion(flow, 3, 4), [0.0])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_full_size_frames_are_shown_upright_as_a_player_shows_them(tmp_path, rotation):
    # A phone stores a portrait video as landscape frames with a display rotation; OpenCV applies it.
    video = render_toy_video(tmp_path / "phone.mp4", scenes=1, rotation=rotation)
    scores = score_frames(_job(video, tmp_path), CFG.keyframes)
    wanted = [0, 9, video.shots[-1][1] - 1]
    frames = read_frames(video.path, wanted, scores.pts, scores.keys, "auto")
    capture = cv2.VideoCapture(str(video.path))
    shown = []
    while (read := capture.read())[0]:
        shown.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    assert shown[0].shape[:2] == ((160, 96) if rotation % 180 else (96, 160))
    for index in wanted:
        assert frames[index].shape == shown[index].shape
        # Two decoders' colour conversions differ by a few levels; a turned frame differs by far more.
        assert np.abs(frames[index].astype(int) - shown[index]).mean() < 4


def test_scoring_shows_a_frame_progress_bar_only_when_asked(graded, tmp_path, capsys):
    # Stage 3 decodes a whole film: the stage's bar (one step per video) would stand still for minutes.
    video, _ = graded
    frames = video.shots[-1][1]
    score_frames(VideoJob("toy", video.path, tmp_path, progress=True), CFG.keyframes, total=frames)
    assert f"0/{frames} [" in capsys.readouterr().err  # the bar clears itself when done (leave=False)
    score_frames(_job(video, tmp_path), CFG.keyframes, total=frames)
    assert capsys.readouterr().err == ""


def test_full_size_frames_of_anamorphic_video_have_square_pixels(tmp_path):
    # DV and DVD footage stores wide frames squeezed, with a sample aspect ratio that a player stretches by.
    image = np.zeros((96, 80, 3), np.uint8)
    image[:, :40] = 255
    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"x264-params": "log-level=none"})
        stream.height, stream.width, stream.pix_fmt = 96, 80, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    scores = score_frames(VideoJob("dv", path, tmp_path), CFG.keyframes)
    frame = read_frames(path, [2], scores.pts, scores.keys, "auto")[2]
    assert frame.shape == (96, 160, 3)
    assert frame[:, 4:76].min() > 200 and frame[:, 84:156].max() < 50  # the white half is half the width
