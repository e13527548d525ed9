"""Benchmark loaders (ViStoryBench's published layout, the DreamShot test format and its converter, the toy
benchmark), reading output folders, and mask crops. Every loader fault names the story and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dreamshot.config.schema import EvalConfig, ToyWorldConfig
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.eval.benchmarks.dreamshot_test import load_dreamshot_test, main, manifest_to_test
from dreamshot.eval.benchmarks.toy import load_toy
from dreamshot.eval.benchmarks.vistorybench import load_vistorybench
from dreamshot.eval.crops import DetectorCrops, MaskCrops
from dreamshot.eval.generation import IMAGE_SUFFIXES, read_story_shots, story_for_mode, story_shot_files, write_story
from dreamshot.eval.suite import crop_mode
from dreamshot.inference.outputs import SHEET_FILE, shot_index
from dreamshot.utils.errors import ConfigError, DataError


def _text(en: str) -> dict:
    return {"en": en, "ch": "中文"}


def vistory_story(characters: dict[str, str], shots: list[list[str]]) -> dict:
    """A story.json body in the published schema: character key -> tag; per shot, the keys appearing."""
    return {
        "Story_type": _text("Children's Picture Books"),
        "Characters": {
            key: {
                "tag": tag,
                "name_en": key.title(),
                "name_ch": "名字",
                "prompt_en": f"{key} in a blue coat",
                "prompt_ch": "描述",
                "num_of_appearances": 2,
            }
            for key, tag in characters.items()
        },
        "Shots": [
            {
                "index": i + 1,
                "Plot Correspondence": _text(f"plot {i + 1}"),
                "Setting Description": _text(f"A forest at dawn {i + 1}."),
                "Shot Perspective Design": _text("Medium shot"),
                "Characters Appearing": {"en": keys, "ch": ["名字"] * len(keys)},
                "Static Shot Description": _text(f"{' and '.join(keys)} walk."),
            }
            for i, keys in enumerate(shots)
        ],
    }


def write_vistory(root: Path, stories: dict[str, dict]) -> Path:
    for name, body in stories.items():
        folder = root / "ViStory" / name
        folder.mkdir(parents=True)
        (folder / "story.json").write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
        for key in body["Characters"]:
            (folder / "image" / key).mkdir(parents=True)
            for k in (1, 0):
                Image.new("RGB", (20, 30), (40 * k, 90, 10)).save(folder / "image" / key / f"{k:02d}.jpg")
    return root


def test_vistorybench_loader_reads_the_published_schema(tmp_path):
    root = write_vistory(
        tmp_path,
        {
            "08": vistory_story({"lily": "realistic_human", "fox": "non_human"}, [["lily"], ["lily", "fox"], []]),
            "01": vistory_story({"bear": "unrealistic_human"}, [["bear"]]),
        },
    )
    bench = load_vistorybench(root)
    assert bench.name == "vistorybench" and [s.id for s in bench.stories] == ["01", "08"]
    story = bench.stories[1]
    lily = story.characters["lily"]
    assert (lily.name, lily.tag, lily.prompt) == ("Lily", "realistic_human", "Lily: lily in a blue coat")
    assert [p.name for p in lily.images] == ["00.jpg", "01.jpg"]
    assert lily.identity_images == lily.images
    shot = story.shots[1]
    assert (shot.index, shot.characters) == (2, ("lily", "fox"))
    assert (shot.scene, shot.camera, shot.action) == ("A forest at dawn 2.", "Medium shot", "lily and fox walk.")
    assert shot.prompt == "Medium shot. A forest at dawn 2. lily and fox walk."
    assert load_vistorybench(root / "ViStory").stories[0].id == "01"  # the ViStory folder itself also works
    with pytest.raises(DataError, match=r"lite split story 09 not found"):
        load_vistorybench(root, "lite")


def test_vistorybench_cids_reads_only_lower_case_jpg_references(tmp_path):
    root = write_vistory(tmp_path, {"02": vistory_story({"fox": "non_human"}, [["fox"]])})
    folder = root / "ViStory" / "02" / "image" / "fox"
    (folder / "01.jpg").rename(folder / "01.PNG")
    (folder / "extra").mkdir()
    Image.new("RGB", (20, 30)).save(folder / "extra" / "02.jpg")
    Image.new("RGB", (20, 30)).save(folder / "03.JPG", format="JPEG")
    fox = load_vistorybench(root).stories[0].characters["fox"]
    assert [p.relative_to(folder).as_posix() for p in fox.images] == ["00.jpg", "01.PNG", "03.JPG", "extra/02.jpg"]
    assert [p.relative_to(folder).as_posix() for p in fox.identity_images] == ["00.jpg", "extra/02.jpg"]


def _break(body: dict, fault: str) -> dict:
    if fault == "missing field":
        del body["Shots"][1]["Setting Description"]
    elif fault == "unknown character":
        body["Shots"][0]["Characters Appearing"]["en"] = ["wolf"]
    elif fault == "bad tag":
        body["Characters"]["lily"]["tag"] = "robot"
    elif fault == "index":
        body["Shots"][0]["index"] = "1"
    return body


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("missing field", r"story '03': Shots\[1\]\.Setting Description: missing field"),
        ("unknown character", r"story '03': Shots\[0\]\.Characters Appearing\.en: 'wolf' is not a key"),
        ("bad tag", r"story '03': Characters\.lily\.tag: unknown tag 'robot'"),
        ("index", r"story '03': Shots\[0\]\.index: expected a number, got a string"),
    ],
)
def test_vistorybench_faults_name_story_and_field(tmp_path, fault, expected):
    body = _break(vistory_story({"lily": "realistic_human"}, [["lily"], ["lily"]]), fault)
    root = write_vistory(tmp_path, {"03": body})
    with pytest.raises(DataError, match=expected) as err:
        load_vistorybench(root)
    assert str(root / "ViStory" / "03" / "story.json") in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory) -> Path:
    return generate_toyworld(tmp_path_factory.mktemp("toyworld"), groups=2, seed=3, image_size=(32, 48))


def test_manifest_converts_to_the_test_format_and_loads_back(toy_manifest, tmp_path):
    out = manifest_to_test(toy_manifest, tmp_path / "sub" / "test.jsonl", tag="realistic_human", previous=2)
    bench = load_dreamshot_test(out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["characters"][0]["images"][0].startswith("../")  # relative to the test file
    story = bench.stories[0]
    assert story.id == "toy-00000" and story.previous == min(2, len(story.shots) - 1)
    role1 = story.characters["role1"]
    assert role1.name == "<Role 1>" and role1.tag == "realistic_human" and role1.masks[0].is_file()
    assert all(shot.scene == shot.camera == shot.action == shot.prompt for shot in story.shots)
    assert all(set(shot.characters) == set(shot.masks) for shot in story.shots)
    assert story.has_masks()
    assert main([str(toy_manifest), str(tmp_path / "cli.jsonl"), "--previous", "1"]) == 0
    assert load_dreamshot_test(tmp_path / "cli.jsonl").stories[1].previous == 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s["shots"][0].update(annotation="x"), r"story 'toy-00000': shots\[0\]\.annotation: unknown field"),
        (lambda s: s.update(previous=99), r"story 'toy-00000': previous: must be in 0\.\."),
        (lambda s: s["shots"][0].pop("image"), r"story 'toy-00000': shots\[0\]\.image: a previous shot"),
        (lambda s: s["characters"][0].update(images=["nope.png"]), r"characters\[0\]\.images\[0\]: file not found"),
        (lambda s: s["shots"][0].update(characters=["role9"]), r"shots\[0\]\.characters\[0\]: 'role9' is not a"),
        (lambda s: s["characters"][0].update(tag="cat"), r"characters\[0\]\.tag: unknown tag 'cat'"),
    ],
)
def test_test_format_faults_name_line_story_and_field(toy_manifest, tmp_path, edit, expected):
    path = manifest_to_test(toy_manifest, toy_manifest.parent / "faulty.jsonl", previous=1)
    lines = path.read_text().splitlines()
    story = json.loads(lines[0])
    edit(story)
    path.write_text(json.dumps(story) + "\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=expected) as err:
        load_dreamshot_test(path)
    assert f"{path}:1:" in str(err.value)


def test_toy_benchmark_has_exact_masks_and_picks_mask_crops(tmp_path):
    bench = load_toy(ToyWorldConfig(groups=3, seed=5, image_size=[32, 48]), tmp_path)
    assert bench.name == "toy" and len(bench.stories) == 3
    assert all(story.has_masks() and story.previous == 1 for story in bench.stories)
    assert all(c.tag == "non_human" for c in bench.characters())
    assert crop_mode(EvalConfig(), bench) == "masks"
    assert load_toy(ToyWorldConfig(groups=3, seed=5, image_size=[32, 48]), tmp_path) == bench  # reused


def test_mask_crops_need_masks(tmp_path):
    root = write_vistory(tmp_path, {"01": vistory_story({"bear": "non_human"}, [["bear"]])})
    bench = load_vistorybench(root)
    assert crop_mode(EvalConfig(), bench) == "detector"
    with pytest.raises(ConfigError, match=r"eval\.crops=masks, but story '01'"):
        crop_mode(EvalConfig(crops="masks"), bench)


def test_auto_crops_detect_drawn_shots_of_a_benchmark_with_masks(toy_manifest, tmp_path):
    # The test set's masks outline the characters of its true shots, not where a model draws them: CIDS on
    # drawn shots detects (the paper's ViStoryBench protocol) unless eval.crops=masks asks for them.
    bench = load_dreamshot_test(manifest_to_test(toy_manifest, tmp_path / "test.jsonl"))
    assert all(story.has_masks() for story in bench.stories)
    assert crop_mode(EvalConfig(), bench) == "detector"
    assert crop_mode(EvalConfig(crops="masks"), bench) == "masks"


def test_mask_crops_follow_the_mask_onto_the_generated_size(tmp_path):
    bench = load_toy(ToyWorldConfig(groups=1, seed=2, image_size=[32, 48]), tmp_path)
    story = bench.stories[0]
    shot = story.shots[0]
    truth = Image.open(shot.image).convert("RGB")
    crops = MaskCrops().shot_crops(truth, shot)
    assert [owner for owner, _ in crops] == list(shot.characters)
    # The same shot drawn at twice the size: the crops scale with it.
    big = MaskCrops().shot_crops(truth.resize((96, 64), Image.NEAREST), shot)
    assert [c.size for _, c in big] == [(2 * c.width, 2 * c.height) for _, c in crops]
    [reference] = MaskCrops().reference_crops(story.characters["role1"])
    assert reference.width < Image.open(story.characters["role1"].images[0]).width


def test_output_folder_reading(tmp_path):
    bench = load_toy(ToyWorldConfig(groups=1, seed=2, image_size=[32, 48], min_shots=3, max_shots=3), tmp_path)
    story = bench.stories[0]
    folder = tmp_path / "outputs" / story.id / "shots"
    folder.mkdir(parents=True)
    for name in ("shot_01.png", "02.jpg", "my_story_3.png", "storyboard.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    shots = read_story_shots(tmp_path / "outputs", story, "r2s")
    assert sorted(shots) == [1, 2, 3]
    assert sorted(read_story_shots(tmp_path / "outputs", story, "s2s")) == [2, 3]  # the first shot is given
    (folder / "shot_03.png").write_bytes((folder / "my_story_3.png").read_bytes())
    with pytest.raises(DataError, match=r"story toy-00000: shot 3: two files"):
        read_story_shots(tmp_path / "outputs", story, "r2s")
    for name in ("shot_03.png", "my_story_3.png"):
        (folder / name).unlink()
    with pytest.raises(DataError, match=r"story toy-00000: shot 3: no image \(e\.g\. shot_03\.png\)"):
        read_story_shots(tmp_path / "outputs", story, "r2s")


class _NoBoxes:
    def crops(self, image, limit=None):
        return []


def test_metrics_read_the_stored_pixels_as_vistorybench_does(tmp_path):
    # ViStoryBench's metric code reads Image.open(path).convert("RGB"): no EXIF orientation, alpha dropped.
    root = write_vistory(tmp_path / "data", {"01": vistory_story({"bear": "non_human"}, [["bear"]])})
    story = load_vistorybench(root).stories[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it to 20 x 30
    Image.new("RGB", (30, 20), (200, 0, 0)).save(story.characters["bear"].identity_images[0], exif=exif)
    [whole, _] = DetectorCrops(_NoBoxes()).reference_crops(story.characters["bear"])
    assert whole.size == (30, 20)
    folder = tmp_path / "outputs" / "01"
    folder.mkdir(parents=True)
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "shot_01.png")
    [shot] = read_story_shots(tmp_path / "outputs", story, "r2s").values()
    assert shot.getpixel((0, 0)) == (10, 20, 30)  # the colour under the transparent pixel, not white


def test_shot_files_are_named_and_read_as_vistorybench_reads_them(tmp_path):
    assert [shot_index(n) for n in ("shot_01.png", "01.jpg", "my_story_3.PNG", "shot_3.v2.png", "a_b.c_12.gif")] == [
        1,
        1,
        3,
        3,
        12,
    ]
    assert [shot_index(n) for n in ("storyboard.png", "shot-03.png", "shot_03_v2.png", "shot_.png")] == [None] * 4
    bench = load_toy(ToyWorldConfig(groups=1, seed=2, image_size=[32, 48], min_shots=3, max_shots=3), tmp_path)
    story = bench.stories[0]
    folder = tmp_path / "outputs" / story.id
    folder.mkdir(parents=True)
    names = ("SHOT_01.PNG", "frame_2.gif", "shot_3.final.JPEG", "storyboard.png", "shot-03.png", "shot_03_v2.png")
    for name in (*names, "._shot_01.png"):  # a macOS resource fork beside the shots: hidden, not a shot
        Image.new("RGB", (8, 8)).save(folder / name, format="GIF" if name.endswith(".gif") else "PNG")
    (folder / SHEET_FILE).parent.mkdir()
    Image.new("RGB", (8, 8)).save(folder / SHEET_FILE)
    assert {i: p.name for i, p in story_shot_files(tmp_path / "outputs", story, "r2s").items()} == {
        1: "SHOT_01.PNG",
        2: "frame_2.gif",
        3: "shot_3.final.JPEG",
    }
    assert read_story_shots(tmp_path / "outputs", story, "r2s")[2].mode == "RGB"
    (folder / "frame_2.gif").rename(folder / "frame_2.webp")  # ViStoryBench does not read WebP
    with pytest.raises(DataError, match=r"shot 2: no image \(e\.g\. shot_02\.png\); frame_2\.webp is not read"):
        story_shot_files(tmp_path / "outputs", story, "r2s")


def test_the_contact_sheet_is_not_where_vistorybench_reads_shots(tmp_path):
    # ViStoryBench's reader takes every image file of the story folder for a shot and stops on a name without
    # a shot number: nothing but shots may lie there.
    write_story(tmp_path, {1: Image.new("RGB", (8, 8)), 2: Image.new("RGB", (8, 8))}, Image.new("RGB", (16, 8)))
    images = [p for p in tmp_path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    assert sorted(shot_index(p) for p in images) == [1, 2]
    assert (tmp_path / SHEET_FILE).is_file()


def test_modes_give_the_pipeline_references_texts_or_previous_shots(tmp_path):
    story = load_toy(ToyWorldConfig(groups=1, seed=2, image_size=[32, 48], min_shots=3, max_shots=3), tmp_path).stories[
        0
    ]
    r2s, t2s, s2s = (story_for_mode(story, mode) for mode in ("r2s", "t2s", "s2s"))
    assert [r.role for r in r2s.references] == list(story.characters) and len(r2s.shots) == 3
    assert t2s.references == [] and t2s.previous_shots == [] and len(t2s.shots) == 3
    assert s2s.references == [] and [p.image for p in s2s.previous_shots] == [story.shots[0].image]
    assert [s.annotation for s in s2s.shots] == [s.prompt for s in story.shots[1:]]
