"""Stage 3 of `dreamshot prepare` on interlaced toy videos (DVD, TV, camcorder footage): keyframes deinterlaced."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace

import cv2
import numpy as np
import pytest

from dreamshot.prepare import keyframes, pipeline, shots
from dreamshot.prepare import video as video_module
from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.keyframes import choose_keyframe, full_size_deinterlace, score_frames
from dreamshot.prepare.pipeline import prepare
from dreamshot.prepare.shots import detect_shots, shot_backend
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.prepare.video import probe, read_frames
from dreamshot.utils.errors import ConfigError

CFG = load_prepare_config(overrides=toy_overrides())
# 4 px per frame: the two fields of a frame are 2 px apart, so every vertical edge combs.
PAN = 4.0


def _keyframes(video, tmp_path, deinterlace: str) -> dict[int, np.ndarray]:
    """Stage 3's full-size keyframes of the video's known shots, frame index -> RGB."""
    cfg = replace(CFG.keyframes, deinterlace=deinterlace)
    scores = score_frames(VideoJob("toy", video.path, tmp_path), cfg)
    chosen = [choose_keyframe(scores, start, end, cfg) for start, end in video.shots]
    return read_frames(video.path, chosen, scores.pts, scores.keys, deinterlace)


def combing(image: np.ndarray) -> float:
    """Mean |2 row[y] - row[y-1] - row[y+1]| of the luma: each row against its two neighbours, which are
    the other field's, so rows filmed at another time than their neighbours score high."""
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(float)
    return float(np.abs(2 * luma[1:-1] - luma[:-2] - luma[2:]).mean())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The same panning toy video progressive, interlaced and flagged, and interlaced but flagged progressive."""
    folder = tmp_path_factory.mktemp("v")
    return {
        name: render_toy_video(folder / f"{name}.mp4", scenes=2, pan=PAN, interlaced=name != "progressive", **extra)
        for name, extra in [("progressive", {}), ("interlaced", {}), ("unflagged", {"flag_interlaced": False})]
    }


def _relative_combing(frames: dict[int, np.ndarray], source: dict[int, np.ndarray]) -> list[float]:
    return [combing(frames[index]) / combing(source[index]) for index in frames]


def _progressive_frames(clips, indices, tmp_path) -> dict[int, np.ndarray]:
    video = clips["progressive"]
    scores = score_frames(VideoJob("p", video.path, tmp_path), CFG.keyframes)
    return read_frames(video.path, list(indices), scores.pts, scores.keys, "never")


def test_keyframes_of_an_interlaced_video_show_no_combing(clips, tmp_path):
    frames = _keyframes(clips["interlaced"], tmp_path, "auto")
    source = _progressive_frames(clips, frames, tmp_path)
    # Deinterlaced: no more row-to-row change than the progressive source's (bwdif softens it a little).
    assert max(_relative_combing(frames, source)) < 1.2
    combed = _keyframes(clips["interlaced"], tmp_path, "never")
    assert min(_relative_combing(combed, _progressive_frames(clips, combed, tmp_path))) > 1.5  # so it could fail


def test_interlaced_footage_flagged_progressive_is_deinterlaced_only_always(clips, tmp_path):
    video = clips["unflagged"]
    for mode, low, high in [("auto", 1.5, np.inf), ("always", 0, 1.2)]:
        frames = _keyframes(video, tmp_path, mode)
        assert low < min(_relative_combing(frames, _progressive_frames(clips, frames, tmp_path))), mode
        assert max(_relative_combing(frames, _progressive_frames(clips, frames, tmp_path))) < high, mode


def test_the_sharp_frame_is_chosen_not_a_combed_one(tmp_path):
    # As filmed: where the camera rests for a frame it is sharp and its fields agree; the frames of the pan are
    # slightly blurred, but their fields comb, which the Laplacian scores as sharper than the still frame.
    layout = render_toy_video(tmp_path / "layout.mp4", scenes=2)
    rng = np.random.default_rng(1)
    still = [int(rng.integers(start + 1, end - 1)) for start, end in layout.shots]
    blur = {f: float(rng.uniform(0.7, 1.2)) for s, e in layout.shots for f in range(s, e) if f not in still}
    video = render_toy_video(tmp_path / "rest.mp4", scenes=2, pan=PAN, blur=blur, still=set(still), interlaced=True)
    chosen = {}
    for mode in ("auto", "never"):
        cfg = replace(CFG.keyframes, deinterlace=mode)
        scores = score_frames(VideoJob("toy", video.path, tmp_path), cfg)
        chosen[mode] = [choose_keyframe(scores, start, end, cfg) for start, end in video.shots]
    assert chosen["auto"] == still
    assert chosen["never"] != still  # the combed frames win without deinterlacing: the test could fail


def test_deinterlacing_keeps_every_frame_its_index_and_timestamp(clips, tmp_path):
    video = clips["interlaced"]
    job = VideoJob("toy", video.path, tmp_path)
    scores = {mode: score_frames(job, replace(CFG.keyframes, deinterlace=mode)) for mode in ("auto", "never")}
    assert len(scores["auto"].times) == video.shots[-1][1]
    assert scores["auto"].pts == scores["never"].pts and scores["auto"].keys == scores["never"].keys
    np.testing.assert_array_equal(scores["auto"].times, scores["never"].times)
    # Frames read after a seek (a keyframe every 16 frames) are the frames of a pass from the start: the
    # deinterlacer saw the same neighbours. 16 and 32 are I-frames, 17 follows one.
    auto = scores["auto"]
    every = read_frames(video.path, list(range(len(auto.pts))), auto.pts, auto.keys, "auto")
    wanted = [16, 17, 32, 40, len(auto.pts) - 1]
    assert set(wanted) & set(auto.keys)
    for index, frame in read_frames(video.path, wanted, auto.pts, auto.keys, "auto").items():
        np.testing.assert_array_equal(frame, every[index])


def test_a_progressive_video_is_read_again_without_the_filter_and_its_extra_frames(clips, tmp_path, monkeypatch):
    # Under auto the filter changes no progressive frame, but its full-size pass also decodes the frame before
    # each target: for a target on an I-frame, the whole group of pictures before it. Stage 3 skips both.
    decoded = []
    frames = video_module._frames
    monkeypatch.setattr(video_module, "_frames", lambda *a: (decoded.append(1) or f for f in frames(*a)))
    job = VideoJob("p", clips["progressive"].path, tmp_path)
    scores = score_frames(job, CFG.keyframes)
    assert (
        not scores.interlaced
        and score_frames(VideoJob("i", clips["interlaced"].path, tmp_path), CFG.keyframes).interlaced
    )
    chosen = scores.keys[1:3]  # targets on I-frames, where the frame before is another group's
    counts = {}
    for mode in ("auto", "never"):
        decoded.clear()
        images = read_frames(job.path, chosen, scores.pts, scores.keys, mode)
        counts[mode] = len(decoded)
        for index, image in images.items():
            np.testing.assert_array_equal(image, _progressive_frames(clips, [index], tmp_path)[index])
    assert counts["never"] < counts["auto"]
    assert full_size_deinterlace(scores, CFG.keyframes) == "never"
    inputs = {"curation": asdict(probe(job.path))}
    inputs["shots"] = shots.run(job, inputs, CFG, None).data
    modes = []
    monkeypatch.setattr(keyframes, "read_frames", lambda *a: modes.append(a[-1]) or read_frames(*a))
    keyframes.run(job, inputs, CFG, None)
    assert modes == ["never"]


def test_the_deinterlace_setting_redoes_stage_3_and_the_later_ones(clips, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clips["interlaced"].path, folder)
    overrides = toy_overrides()
    prepare(folder, tmp_path / "out", load_prepare_config(overrides=overrides), progress=False)
    ran = []
    for stage in pipeline.STAGES:
        monkeypatch.setattr(
            stage.module, "run", lambda *a, _n=stage.name, _r=stage.module.run: ran.append(_n) or _r(*a)
        )
    never = load_prepare_config(overrides=[*overrides, "keyframes.deinterlace=never"])
    prepare(folder, tmp_path / "out", never, progress=False)
    assert ran == ["keyframes", "quality", "grouping", "roles"]


def test_the_default_shot_backend_finds_the_cuts_of_an_interlaced_video(clips, tmp_path):
    # PySceneDetect's OpenCV backend gets every interlaced frame the same here (OpenCV 5.0's swscale refuses
    # interlaced frames): no cuts, one shot. The default (auto) decodes the flagged video with PyAV instead.
    assert CFG.shots.backend == "auto"
    for name in ("interlaced", "progressive", "unflagged"):
        video = clips[name]
        found = detect_shots(VideoJob(name, video.path, tmp_path), CFG.shots)
        assert [start for start, _ in found[1:]] == pytest.approx([cut / video.fps for cut in video.cuts]), name
    resolved = {name: shot_backend(VideoJob(name, clips[name].path, tmp_path), CFG.shots) for name in clips}
    assert resolved == {"progressive": "opencv", "interlaced": "pyav", "unflagged": "opencv"}
    opencv = detect_shots(VideoJob("i", clips["interlaced"].path, tmp_path), replace(CFG.shots, backend="opencv"))
    assert len(opencv) == 1  # what the old default found: the test could fail
    with pytest.raises(ConfigError, match="shots.backend must be one of auto, opencv, pyav"):
        load_prepare_config(overrides=["shots.backend=ffmpeg"])


def test_the_deinterlace_setting_is_checked():
    assert CFG.keyframes.deinterlace == "auto"
    # YAML 1.1 reads `off` as false: the setting's words are not on / off, and false is refused naming the key.
    with pytest.raises(ConfigError, match="keyframes.deinterlace must be one of auto, always, never"):
        load_prepare_config(overrides=["keyframes.deinterlace=off"])
