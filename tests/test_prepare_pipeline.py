"""`dreamshot prepare` end to end on toy videos: manifest, scenes, report, resume, CLI."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch

from dreamshot.cli import main
from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import load_manifest
from dreamshot.prepare import curation, grouping, keyframes, pipeline, quality, roles, shots
from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.pipeline import STAGES, prepare
from dreamshot.prepare.report import format_table
from dreamshot.prepare.space import prepare_bytes
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import folder_bytes

STAGE_MODULES = {"curation": curation, "shots": shots, "keyframes": keyframes, "quality": quality}
STAGE_MODULES.update({"grouping": grouping, "roles": roles})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two toy videos (3 and 2 scenes) and one dated 2010, in a folder."""
    folder = tmp_path_factory.mktemp("videos")
    truth = {
        "a": render_toy_video(folder / "a.mp4", scenes=3, seed=0, blur={5: 2.0, 20: 2.5}),
        "b": render_toy_video(folder / "sub" / "b.mp4", scenes=2, seed=1),
    }
    render_toy_video(folder / "old.mp4", scenes=1, seed=0, metadata={"creation_time": "2010-06-01T00:00:00Z"})
    return folder, truth


def _config(*extra: str):
    return load_prepare_config(overrides=[*toy_overrides(), *extra])


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return out, prepare(videos[0], out, _config(), progress=False)


def test_manifest_passes_the_training_loader(prepared):
    out, summary = prepared
    records = load_manifest(out / "manifest.jsonl")
    assert summary.groups == len(records) >= 3
    dataset = StoryboardDataset(records, (64, 112), max_shots=8, train=False)
    item = dataset[0]
    assert item["shots"].shape[1:] == (3, 64, 112) and torch.isfinite(item["shots"]).all()
    for record in records:
        assert record.references, "toy characters are found by the offline segmenter"
        for shot in record.shots:
            assert shot.annotation and shot.masks


def test_grouping_keeps_the_known_scenes_together(prepared, videos):
    out, _ = prepared
    _, truth = videos
    for line in (out / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        video = truth[record["id"].split("-g")[0].removeprefix("sub_")]
        # Keyframe files are named shot<n>_f<frame>.png; the frame says which scene it was drawn from.
        frames = [int(shot["image"].rsplit("_f", 1)[1].split(".")[0]) for shot in record["shots"]]
        shot_of = [next(n for n, (s, e) in enumerate(video.shots) if s <= f < e) for f in frames]
        assert len({video.scenes[n] for n in shot_of}) == 1, record["id"]
    groups = {json.loads(line)["id"].split("-g")[0] for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert groups == {"a", "sub_b"}
    count = sum(1 for _ in (out / "manifest.jsonl").read_text().splitlines())
    assert count == 3 + 2  # one group per scene (every toy scene has at least two shots)


def test_report_counts_kept_and_dropped_with_reasons(prepared, videos):
    out, summary = prepared
    report = json.loads((out / "prepare_report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == [stage.name for stage in STAGES]
    assert stages["curation"]["kept"] == 2 and stages["curation"]["dropped"] == {"dated before 2015": 1}
    cuts = sum(len(video.shots) for video in videos[1].values())
    assert stages["shots"]["kept"] == cuts and stages["keyframes"]["kept"] == cuts
    assert stages["grouping"]["kept"] == report["shots"] == summary.shots
    assert stages["roles"]["kept"] == report["groups"] == summary.groups
    table = format_table(summary.counts)
    assert "dated before 2015: 1" in table and table.splitlines()[0].startswith("stage")
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert len(provenance) == summary.groups
    assert provenance[0]["masks"] == "placeholder:border_colour" and provenance[0]["text"] == "placeholder:placeholder"


def _count_calls(monkeypatch) -> dict[str, list[str]]:
    """Wrap every stage's `run` to record the video ids it is called for."""
    calls: dict[str, list[str]] = {name: [] for name in STAGE_MODULES}
    for name, module in STAGE_MODULES.items():
        original = module.run

        def counted(job, *args, _name=name, _original=original):
            calls[_name].append(job.id)
            return _original(job, *args)

        monkeypatch.setattr(module, "run", counted)
    return calls


def test_rerun_after_an_interruption_redoes_nothing(videos, tmp_path, monkeypatch):
    folder, _ = videos
    cfg = _config()
    backends = pipeline.build_backends(cfg)
    group = backends.judge.group

    def interrupted(images):
        if interrupted.windows == 1:  # the second video's grouping is cut short
            raise KeyboardInterrupt
        interrupted.windows += 1
        return group(images)

    interrupted.windows = 0
    backends.judge.group = interrupted
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, tmp_path, cfg, backends, progress=False)
    assert not (tmp_path / "manifest.jsonl").exists()

    calls = _count_calls(monkeypatch)
    summary = prepare(folder, tmp_path, cfg, progress=False)
    assert calls == {n: [] for n in ("curation", "shots", "keyframes", "quality")} | {
        "grouping": ["sub_b"],
        "roles": ["a", "sub_b"],
    }
    assert summary.groups == 5
    assert [c.done for c in summary.counts] == [0, 0, 0, 0, 1, 2]

    calls = _count_calls(monkeypatch)
    again = prepare(folder, tmp_path, cfg, progress=False)
    assert all(not ids for ids in calls.values())
    assert (again.groups, again.shots) == (summary.groups, summary.shots)


def test_a_changed_setting_redoes_that_stage_and_the_later_ones(prepared, videos, tmp_path, monkeypatch):
    out, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    calls = _count_calls(monkeypatch)
    prepare(videos[0], data, _config("grouping.window=4", "grouping.overlap=1"), progress=False)
    assert [name for name, ids in calls.items() if ids] == ["grouping", "roles"]


def test_cli_prints_the_summary_and_reports_bad_settings(videos, tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text("curation:\n  min_short_side: 0\n  min_bitrate_kbps: 0\n")
    options = ["--out", str(tmp_path / "out"), "--config", str(config), "--no-progress"]
    assert main(["prepare", str(videos[0]), *toy_overrides()[2:], *options]) == 0
    printed = capsys.readouterr().out
    assert "why dropped" in printed and "5 groups" in printed
    assert main(["prepare", str(videos[0]), "shots.detectr=hash", *options]) == 2
    assert "shots.detectr" in capsys.readouterr().err
    assert main(["prepare", str(videos[0]), "shots.detector=magic", *options]) == 2
    assert "shots.detector must be one of" in capsys.readouterr().err


def test_the_space_estimate_covers_what_is_written(prepared, videos):
    out, _ = prepared
    assert folder_bytes(out) <= prepare_bytes(pipeline.find_videos(videos[0], out), _config())


def test_too_little_space_is_reported_before_a_video_is_decoded(videos, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    monkeypatch.setattr(pipeline, "build_backends", lambda *a: pytest.fail("a model was built"))
    monkeypatch.setattr(shots, "detect_shots", lambda *a: pytest.fail("a video was decoded"))
    assert main(["prepare", str(videos[0]), *toy_overrides(), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "GiB free, the keyframes, masks and references of 3 videos need about" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    assert main(["prepare", str(tmp_path / "videos"), "--out", str(tmp_path / "out")]) == 2
    assert "no video files" in capsys.readouterr().err


def test_paths_that_give_one_video_id_are_an_error_naming_both(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a b.mp4", "a_b.mp4"):
        (videos / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"a_b\.mp4: has the same id 'a_b' as .*a b\.mp4"):
        pipeline.find_videos(videos, tmp_path / "out")


def test_files_deleted_after_a_run_are_made_again_on_the_next(prepared, videos, tmp_path, monkeypatch):
    out, summary = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    keyframe = sorted((data / "frames" / "a").glob("*.png"))[0]
    mask = sorted((data / "groups" / "sub_b").rglob("*_mask.png"))[0]
    keyframe.unlink()
    mask.unlink()
    calls = _count_calls(monkeypatch)
    again = prepare(videos[0], data, _config(), progress=False)
    # Only the stages that wrote the missing files run again, for their video; the rest is read back.
    assert {name: ids for name, ids in calls.items() if ids} == {"keyframes": ["a"], "roles": ["sub_b"]}
    assert keyframe.is_file() and mask.is_file()
    assert (again.groups, again.shots) == (summary.groups, summary.shots)
    assert (data / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()


def test_a_manifest_that_fails_the_loaders_checks_never_replaces_the_last_one(prepared, videos, tmp_path, monkeypatch):
    out, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    original = roles.run

    def broken(*args):
        result = original(*args)
        result.data["records"][0]["shots"][0]["image"] = "frames/missing.png"
        return result

    monkeypatch.setattr(roles, "run", broken)
    with pytest.raises(DataError, match=r"manifest.jsonl:1: .*shots\[0\].image: file not found"):
        prepare(videos[0], data, _config("roles.max_roles=3"), progress=False)
    assert (data / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    assert not list(data.glob(".*.tmp*"))


def test_a_video_that_fails_to_decode_is_dropped_not_the_run(videos, tmp_path, monkeypatch):
    # A broken download can open and then fail mid-stream: the other videos still make their groups.
    real = keyframes.decode_luma

    def failing(path, *args):
        if path.stem == "a":
            raise DataError(f"{path}: decoding failed (Invalid data found when processing input)")
        return real(path, *args)

    monkeypatch.setattr(keyframes, "decode_luma", failing)
    summary = prepare(videos[0], tmp_path, _config(), progress=False)
    counts = {c.stage: c for c in summary.counts}
    assert counts["keyframes"].dropped == {"undecodable video": 1} and counts["roles"].videos == 1
    assert summary.groups == 2  # video b's two scenes
    assert (
        "a.mp4: decoding failed"
        in json.loads((tmp_path / "state" / "a" / "keyframes.json").read_text())["data"]["error"]
    )


def test_vlm_settings_redo_only_stages_that_ask_the_vlm_and_only_when_they_change_answers(
    prepared, videos, tmp_path, monkeypatch
):
    # Raising vlm.timeout_s after requests timed out must not pay for every video's VLM calls again.
    out, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    calls = _count_calls(monkeypatch)
    prepare(videos[0], data, _config("vlm.timeout_s=600", "vlm.max_retries=5", "vlm.model=other"), progress=False)
    assert all(not ids for ids in calls.values()), "no stage asks the VLM with the offline backends"
    vlm = ["grouping.judge=vlm", "vlm.endpoint=http://127.0.0.1:9/v1"]
    offline = pipeline.build_backends(_config())  # the features judge stands in for the VLM's answers
    prepare(videos[0], data, _config(*vlm), offline, progress=False)
    calls = _count_calls(monkeypatch)
    prepare(videos[0], data, _config(*vlm, "vlm.timeout_s=600", "vlm.max_retries=5"), offline, progress=False)
    assert all(not ids for ids in calls.values())
    prepare(videos[0], data, _config(*vlm, "vlm.model=other"), offline, progress=False)
    assert [name for name, ids in calls.items() if ids] == ["grouping", "roles"]


def _images(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for name in ("frames", "groups") for p in (folder / name).rglob("*.png")}


def test_images_of_an_earlier_run_with_other_settings_are_deleted(prepared, videos, tmp_path, capsys):
    out, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    mine = [data / "frames" / "notes.txt", data / "frames" / "a" / "mine.jpg", data / "elsewhere" / "x.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a user's")
    before = _images(data)
    # Motion alone picks other keyframes (stage 3's files are named by frame), so groups get other masks too.
    assert main(["prepare", str(videos[0]), "--out", str(data), *toy_overrides(), "keyframes.sharpness_weight=0"]) == 0
    after = _images(data)
    recorded = {name for path in (data / "state").rglob("*.json") for name in json.loads(path.read_text())["files"]}
    assert recorded - before, "the setting named no other file: the test could not fail"
    assert after == recorded  # the earlier run's images that no state records are gone
    assert f"deleted {len(before - after)} images of earlier runs" in capsys.readouterr().out
    assert all(path.read_text() == "a user's" for path in mine)
    assert load_manifest(data / "manifest.jsonl")
    assert not [p for p in (data / "groups").rglob("*") if p.is_dir() and not any(p.iterdir())]
