"""Stages 1, 4 and 6 of `dreamshot prepare`: curation, quality filters, roles; backends and config."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dreamshot.data.toyworld import plan_group, render_shot
from dreamshot.prepare import curation, quality
from dreamshot.prepare.backends import build_backends
from dreamshot.prepare.config import CurationConfig, PrepareConfig, RolesConfig, load_prepare_config
from dreamshot.prepare.files import save_png
from dreamshot.prepare.overlay import CornerLogoDetector
from dreamshot.prepare.roles import BorderColourSegmenter, colour_feature, match_roles
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.toyvideo import render_toy_video
from dreamshot.prepare.video import VideoInfo, probe
from dreamshot.utils.errors import ConfigError, WeightsError


def _info(**changes) -> VideoInfo:
    base = {"width": 1280, "height": 720, "fps": 24.0, "frames": 240, "duration": 10.0, "bitrate_kbps": 2000.0}
    return VideoInfo(**{**base, "year": 2020, **changes})


def test_curation_applies_the_papers_filters():
    cfg = CurationConfig()
    assert curation.rejection(_info(), cfg) is None
    assert curation.rejection(_info(width=960, height=540), cfg) == "below 720p"
    assert curation.rejection(_info(width=720, height=1280), cfg) is None  # portrait 720p passes
    assert curation.rejection(_info(bitrate_kbps=500.0), cfg) == "below 800 kbps"
    assert curation.rejection(_info(bitrate_kbps=None), cfg) is None
    assert curation.rejection(_info(year=2012), cfg) == "dated before 2015"
    assert curation.rejection(_info(year=None), cfg) is None  # no date: the filter does not apply


def test_curation_reads_the_container(tmp_path):
    video = render_toy_video(tmp_path / "v.mp4", scenes=1, metadata={"creation_time": "2012-03-04T05:06:07Z"})
    info = probe(video.path)
    assert (info.width, info.height, info.fps, info.frames) == (160, 96, 8.0, video.shots[-1][1])
    assert info.year == 2012 and info.bitrate_kbps > 0
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    result = curation.run(VideoJob("broken", tmp_path / "broken.mp4", tmp_path), {}, PrepareConfig(), None)
    assert (result.kept, result.dropped) == (0, {"unreadable": 1})


def _toy_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    plan = plan_group(seed, 0, count, count, 3)
    return [render_shot(plan, shot, 96, 160)[0] for shot in plan.shots]


def _stamp_logo(image: np.ndarray) -> np.ndarray:
    image = image.copy()
    image[80:92, 140:156] = 255
    image[83:89, 144:152] = 0
    return image


def test_corner_logo_detector_flags_a_static_mark_only():
    frames = _toy_frames(5)
    detector = CornerLogoDetector()
    assert detector.detect(frames) == [None] * 5
    assert detector.detect([_stamp_logo(f) for f in frames]) == ["watermark"] * 5
    lined = [f.copy() for f in frames]
    for f in lined:
        f[88, :] = 0  # a letterbox-like line across the frame: persistent, but not a mark
    assert detector.detect(lined) == [None] * 5
    assert detector.detect([_stamp_logo(f) for f in frames[:2]]) == [None, None]  # too few to tell


class _Scores:
    def score(self, images):
        return [float(image.mean() / 25.5) for image in images]  # brighter = "prettier", on 0-10


def test_quality_drops_with_the_first_failing_reason(tmp_path):
    frames = _toy_frames(4)
    frames[3] = frames[3] // 8  # dark: low aesthetic score with the fake scorer
    keyframes = []
    for i, frame in enumerate(frames):
        save_png(frame, tmp_path / "frames" / f"{i}.png")
        keyframes.append({"image": f"frames/{i}.png", "sharpness": 500.0, "contrast": 30.0})
    keyframes[0]["sharpness"] = 5.0
    keyframes[1]["contrast"] = 2.0
    cfg = load_prepare_config(overrides=["quality.min_aesthetic=4"])
    backends = SimpleNamespace(aesthetic=_Scores(), overlay=None)
    result = quality.run(
        VideoJob("v", tmp_path / "v.mp4", tmp_path), {"keyframes": {"keyframes": keyframes}}, cfg, backends
    )
    assert result.dropped == {"blurry": 1, "contentless": 1, "low aesthetic score": 1}
    assert [kf["image"] for kf in result.data["keyframes"]] == ["frames/2.png"]
    assert result.data["keyframes"][0]["aesthetic"] > 4


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_border_colour_segmenter_finds_toy_characters():
    plan = plan_group(0, 3, 4, 4, 3)
    # Touching characters are one region for this placeholder: only shots without occlusion are compared.
    shots = [shot for shot in plan.shots if not shot.occluded]
    assert sum(len(shot.roles) for shot in shots) >= 4
    for shot in shots:
        image, labels = render_shot(plan, shot, 96, 160)
        masks = BorderColourSegmenter().segment(image)
        truth = [labels == k + 1 for k in shot.roles]
        assert len(masks) == len(truth)
        assert all(max(_iou(t, m) for m in masks) > 0.9 for t in truth)


def test_regions_of_one_character_in_different_shots_are_one_role():
    plan = plan_group(0, 3, 4, 4, 3)
    regions = []
    for shot in plan.shots:
        image, labels = render_shot(plan, shot, 96, 160)
        regions.append([(labels == k + 1, colour_feature(image, labels == k + 1)) for k in shot.roles])
    roles = match_roles(regions, RolesConfig())
    truth = {k: {n for n, shot in enumerate(plan.shots) if k in shot.roles} for k in range(len(plan.characters))}
    assert sorted(sorted(role.masks) for role in roles) == sorted(sorted(shots) for shots in truth.values())
    assert len(match_roles(regions, RolesConfig(max_roles=1))) == 1


def test_model_backends_without_weights_or_endpoint_are_clear_errors():
    with pytest.raises(WeightsError, match="quality.aesthetic_siglip"):
        build_backends(load_prepare_config(overrides=["quality.aesthetic=aesthetic_v25"]))
    with pytest.raises(ConfigError, match="grouping.judge.*vlm.endpoint"):
        build_backends(load_prepare_config(overrides=["grouping.judge=vlm"]))
    with pytest.raises(ConfigError, match="roles.annotator.*vlm.endpoint"):
        build_backends(load_prepare_config(overrides=["roles.annotator=vlm"]))


def test_config_errors_name_the_key_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match="grouping.overlap"):
        load_prepare_config(overrides=["grouping.window=4", "grouping.overlap=4"])
    bad = tmp_path / "prepare.yaml"
    bad.write_text("keyframes:\n  sharpnes_weight: 1\n")
    with pytest.raises(ConfigError, match="prepare.yaml.*sharpnes_weight"):
        load_prepare_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_prepare_config(tmp_path / "missing.yaml")


def test_every_setting_is_in_the_settings_table_of_the_docs():
    docs = (Path(__file__).parents[1] / "docs" / "prepare.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`") for line in docs.splitlines() if line.startswith("| `")}
    cfg = PrepareConfig()
    keys = {f"{section}.{key}" for section in asdict(cfg) for key in cfg.section(section)}
    assert sorted(keys - rows) == []
