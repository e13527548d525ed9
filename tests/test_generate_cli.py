"""`dreamshot generate` end to end on the tiny Wan: outputs, re-roll, LoRA loading, story-file faults."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from dreamshot.cli import main
from dreamshot.commands import generate as generate_command
from dreamshot.config.load import to_yaml
from dreamshot.config.schema import Config, ToyWorldConfig
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import ensure_toyworld
from dreamshot.inference import outputs
from dreamshot.inference.contact_sheet import header_height, panel_size
from dreamshot.inference.loading import build_adapter, load_model
from dreamshot.inference.outputs import RECORD_FILE, SHEET_FILE, TAKES_DIR, shot_file, shot_index
from dreamshot.inference.story import image_to_tensor, load_story, reference_images
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.latents import encode_references, encode_shots
from dreamshot.utils.errors import DataError, WeightsError

EXAMPLE_STORY = Path(__file__).resolve().parents[1] / "examples" / "story.yaml"
HEIGHT, WIDTH = 32, 48
STORY = {
    "seed": 0,
    "height": HEIGHT,
    "width": WIDTH,
    "references": [
        {"role": "role1", "image": "refs/role1.png", "prompt": "<Role 1>: a red circle"},
        {"role": "role2", "image": "refs/role2.png", "prompt": "<Role 2>: a blue circle"},
    ],
    "shots": [
        {"annotation": "Wide shot in a meadow: <Role 1> on the left, <Role 2> on the right."},
        {"annotation": "Close-up in a meadow: <Role 2> in the centre."},
        {"annotation": "Medium shot in a meadow: <Role 1> on the right."},
    ],
}


def _reference(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 40), (236, 236, 236))
    ImageDraw.Draw(image).ellipse((8, 8, 32, 32), fill=colour)
    image.save(path)


def _write_story(folder: Path, body: dict, name: str = "story.yaml") -> Path:
    _reference(folder / "refs" / "role1.png", (214, 39, 40))
    _reference(folder / "refs" / "role2.png", (31, 90, 200))
    path = folder / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Path:
    return _write_story(tmp_path_factory.mktemp("story"), STORY)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as training leaves it: config.yaml and a LoRA (non-zero, so it changes the model)."""
    run = tmp_path_factory.mktemp("run")
    cfg = Config()
    cfg.inference.steps = 2
    (run / "config.yaml").write_text(to_yaml(cfg))
    adapter = build_adapter(cfg)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in adapter.lora_state_dict().items()}
    save_file(state, str(run / "lora.safetensors"))
    return run


@pytest.fixture(scope="module")
def generated(story, run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(out)]) == 0
    return out


def test_outputs(generated):
    for n in (1, 2, 3):
        with Image.open(generated / shot_file(n)) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
    assert [shot_index(p) for p in sorted(generated.glob("shot_*.png"))] == [1, 2, 3]
    panel_w, panel_h = panel_size((WIDTH, HEIGHT))
    with Image.open(generated / SHEET_FILE) as sheet:
        # The title, then one reference column and three shots in a row; two references stack to two panels.
        assert sheet.size == (4 * panel_w, header_height("a title") + 2 * panel_h)
    record = json.loads((generated / RECORD_FILE).read_text())
    assert record["mode"] == "r2s" and record["seed"] == 0 and record["steps"] == 2
    assert record["drawn_shots"] == [1, 2, 3] and record["kept_shots"] == [] and record["history"] == []
    assert len(record["timings"]["steps_s"]) == 2 and record["timings"]["total_s"] > 0
    assert record["config"]["inference"]["steps"] == 2 and record["weights"].endswith("lora.safetensors")
    assert [s["annotation"] for s in record["shots"]] == [s["annotation"] for s in STORY["shots"]]


def test_regenerate_keeps_the_other_shots(generated, story, run_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    before = {n: (out / shot_file(n)).read_bytes() for n in (1, 2, 3)}
    calls = []
    original = WanAdapter.predict_velocity

    def record(self, latents, timesteps, text, layout, **kwargs):
        calls.append((self, latents.clone(), layout))
        return original(self, latents, timesteps, text, layout, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict_velocity", record)
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(out), "--regenerate", "2"]) == 0

    assert (out / shot_file(1)).read_bytes() == before[1]
    assert (out / shot_file(3)).read_bytes() == before[3]
    assert (out / shot_file(2)).read_bytes() != before[2]
    # Kept shots stand after the references in the condition slot, clean and unchanged at every step, each
    # encoded in the storyboard's shot stream as training encodes it (the re-rolled shot's earlier take between).
    adapter = calls[0][0]
    stream = torch.stack([image_to_tensor(Image.open(generated / shot_file(n)).convert("RGB")) for n in (1, 2, 3)])
    refs = reference_images(load_story(story), (HEIGHT, WIDTH))
    kept = encode_shots(adapter.vae, stream[None])[:, :, [0, 2]]
    expected = torch.cat([encode_references(adapter.vae, refs[None]), kept], dim=2)
    conditioned = [(latents, layout) for _, latents, layout in calls if layout.num_conditions]
    assert len(conditioned) == 2
    for latents, layout in conditioned:
        assert (layout.num_conditions, layout.num_targets) == (4, 1)
        for row in layout.split(latents)[0]:
            torch.testing.assert_close(row[None], expected, rtol=0, atol=0)
        # Each shot at its story position: references 0, 1; kept shots 1 and 3 at 2 and 4; the drawn shot 2 at 3.
        assert layout.frame_positions().tolist() == [0, 1, 2, 4, 3]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["mode"] == "r2s_s2s" and record["drawn_shots"] == [2] and record["kept_shots"] == [1, 3]
    assert record["seed"] == 1  # the previous seed + 1: a re-roll draws new noise
    assert [h["drawn_shots"] for h in record["history"]] == [[1, 2, 3]]
    # The earlier take is kept, outside the shots a reader of the folder sees; the record counts the takes.
    assert (out / TAKES_DIR / "shot_02_take_1.png").read_bytes() == before[2]
    assert [shot["take"] for shot in record["shots"]] == [1, 2, 1]
    second = (out / shot_file(2)).read_bytes()
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(out), "--regenerate", "2"]) == 0
    assert (out / TAKES_DIR / "shot_02_take_2.png").read_bytes() == second
    assert (out / TAKES_DIR / "shot_02_take_1.png").read_bytes() == before[2]
    assert [shot["take"] for shot in json.loads((out / RECORD_FILE).read_text())["shots"]] == [1, 3, 1]


def _other_story(folder: Path, change: str) -> Path:
    body = json.loads(json.dumps(STORY))
    if change == "shot count":
        body["shots"] = body["shots"][:2]
    elif change == "kept annotation":
        body["shots"][0]["annotation"] = "Wide shot in a desert: <Role 1> alone."
    elif change == "reference prompt":
        body["references"][1]["prompt"] = "<Role 2>: a green square"
    path = _write_story(folder, body)
    if change == "reference image":
        _reference(folder / "refs" / "role1.png", (40, 160, 40))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shot count", "drawn from a story of 3 shots"),
        ("kept annotation", "kept shot 1 was drawn for 'Wide shot in a meadow"),
        ("reference image", "drawn with other references or given shots"),
        ("reference prompt", "drawn with other references or given shots"),
    ],
)
def test_regenerate_with_another_story_is_one_line(change, message, generated, run_dir, tmp_path, capsys):
    other = _other_story(tmp_path / "other", change)
    before = {path.name: path.read_bytes() for path in generated.glob("*.*")}
    assert main(["generate", str(other), "--run", str(run_dir), "--out", str(generated), "--regenerate", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{generated / RECORD_FILE}: {message}" in err
    assert {path.name: path.read_bytes() for path in generated.glob("*.*")} == before


def test_regenerate_takes_a_new_annotation_of_the_re_rolled_shot(generated, run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    body = json.loads(json.dumps(STORY))
    body["shots"][1]["annotation"] = "Close-up in a forest: <Role 2> in the centre."
    path = _write_story(tmp_path / "story", body)  # moved too: the content identifies a story, not its path
    assert main(["generate", str(path), "--run", str(run_dir), "--out", str(out), "--regenerate", "2"]) == 0
    assert json.loads((out / RECORD_FILE).read_text())["shots"][1]["annotation"] == body["shots"][1]["annotation"]


def test_a_record_without_the_conditions_digest_compares_the_reference_prompts(generated, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    record = json.loads((out / RECORD_FILE).read_text())
    del record["conditions_sha256"]  # written before generation.json recorded it
    (out / RECORD_FILE).write_text(json.dumps(record))
    other = _other_story(tmp_path / "other", "reference prompt")
    assert main(["generate", str(other), "--run", str(run_dir), "--out", str(out), "--regenerate", "2"]) == 2
    assert "drawn with references [['role1', '<Role 1>: a red circle'], ['role2', '<Role 2>: a blue circle']]" in (
        capsys.readouterr().err
    )


def test_a_re_roll_killed_before_its_record_never_overwrites_a_take(generated, story, run_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    original = (out / shot_file(2)).read_bytes()

    def killed(*args):
        raise KeyboardInterrupt  # the new take is on disk, generation.json is not

    argv = ["generate", str(story), "--run", str(run_dir), "--out", str(out), "--regenerate", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(generate_command, "write_record", killed)
        assert main(argv) == 130
    half_finished = (out / shot_file(2)).read_bytes()
    assert main(argv) == 0
    assert (out / TAKES_DIR / "shot_02_take_1.png").read_bytes() == original
    assert (out / TAKES_DIR / "shot_02_take_2.png").read_bytes() == half_finished
    assert [shot["take"] for shot in json.loads((out / RECORD_FILE).read_text())["shots"]] == [1, 3, 1]


@pytest.mark.parametrize("killed_in", ["save_shots", "write_record"])
def test_a_re_roll_run_again_after_a_kill_draws_what_the_re_roll_would_have(
    killed_in, generated, story, run_dir, tmp_path, monkeypatch
):
    """Killed after it moved shot 2's take to takes/ (before or after writing its new take): run again, the re-roll
    encodes the kept shots with the take the record lists, not with its own half-finished one or none."""
    argv = ["generate", str(story), "--run", str(run_dir), "--regenerate", "2", "--out"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    shutil.copytree(generated, uninterrupted)
    shutil.copytree(generated, resumed)
    assert main([*argv, str(uninterrupted)]) == 0

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(generate_command, killed_in, killed)
        assert main([*argv, str(resumed)]) == 130
    assert main([*argv, str(resumed)]) == 0
    assert (resumed / shot_file(2)).read_bytes() == (uninterrupted / shot_file(2)).read_bytes()


def test_a_whole_story_drawn_into_a_used_folder_leaves_no_shot_of_the_storyboard_before(generated, run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    (out / TAKES_DIR).mkdir()
    (out / TAKES_DIR / "shot_01_take_1.png").write_bytes((out / shot_file(1)).read_bytes())
    shorter = _write_story(tmp_path / "story", {**STORY, "shots": STORY["shots"][:1]})
    assert main(["generate", str(shorter), "--run", str(run_dir), "--out", str(out)]) == 0
    # A reader of the folder (ViStoryBench takes every numbered image) sees the one shot the record lists.
    assert sorted(path.name for path in out.glob("shot_*.png")) == [shot_file(1)]
    assert not list((out / TAKES_DIR).glob("*.png"))  # the takes were the earlier storyboard's
    assert [shot["take"] for shot in json.loads((out / RECORD_FILE).read_text())["shots"]] == [1]


@pytest.mark.parametrize(
    ("shots", "killed_in"),
    [
        (1, "save_shots"),  # the earlier storyboard's shots 2 and 3 removed, no new shot written yet
        (3, "write_contact_sheet"),  # every shot drawn again (another seed), the record not yet
    ],
)
def test_a_whole_story_killed_while_drawn_into_a_used_folder_leaves_no_record_of_the_storyboard_before(
    shots, killed_in, generated, run_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    story = _write_story(tmp_path / "story", {**STORY, "seed": 1, "shots": STORY["shots"][:shots]})
    argv = ["generate", str(story), "--run", str(run_dir), "--out", str(out)]

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(generate_command, killed_in, killed)
        assert main(argv) == 130
    # Not a storyboard to its readers (`dreamshot animate`, a re-roll): the record of the one before would
    # describe shots that are gone or drawn over.
    assert not (out / RECORD_FILE).exists()
    with pytest.raises(DataError, match=f"{RECORD_FILE}: not found"):
        outputs.storyboard_shots(out)
    assert main(argv) == 0  # the same call draws it whole
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["seed"] == 1 and [shot["file"] for shot in record["shots"]] == [
        shot_file(n + 1) for n in range(shots)
    ]
    assert sorted(path.name for path in out.glob("shot_*.png")) == [shot_file(n + 1) for n in range(shots)]


def test_the_sheet_is_titled_and_shows_given_shots_first_and_marks_re_rolls(story, run_dir, tmp_path, monkeypatch):
    body = json.loads(json.dumps(STORY))
    body["previous_shots"] = [{"image": "refs/role1.png", "annotation": "Earlier: <Role 1> alone."}]
    path = _write_story(tmp_path, body)
    sheets = []
    original = outputs.contact_sheet
    monkeypatch.setattr(outputs, "contact_sheet", lambda *a, **k: sheets.append((a, k)) or original(*a, **k))
    out = tmp_path / "out"
    assert main(["generate", str(path), "--run", str(run_dir), "--out", str(out)]) == 0
    assert main(["generate", str(path), "--run", str(run_dir), "--out", str(out), "--regenerate", "3"]) == 0
    (shots, captions, *_), options = sheets[-1]
    assert len(shots) == 4 and captions[0] == "Earlier: <Role 1> alone."
    # Given shot first, then the story's three shots, the re-rolled third on its second take.
    assert options["tags"] == ["given", "", "", "take 2"]
    title = options["title"]
    assert title.startswith("r2s_s2s · seed 1 · 2 steps · weights ") and "lora.safetensors" in title


def test_an_annotation_naming_a_role_without_a_reference_warns(run_dir, tmp_path, capsys):
    body = json.loads(json.dumps(STORY))
    body["shots"][1]["annotation"] = "Close-up: <Role 3> waves at <Role 2>."
    path = _write_story(tmp_path, body)
    assert main(["generate", str(path), "--run", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "shots[1].annotation names <Role 3>, which no reference shows" in err
    assert "<Role 2>" not in err


def test_a_condition_set_the_run_never_trained_is_refused(generated, story, run_dir, tmp_path, capsys):
    """A run trained on the paper's three modes only never saw references and given shots together."""
    run = tmp_path / "paper_mix"
    shutil.copytree(run_dir, run)
    cfg = Config()
    cfg.storyboard.modes.r2s, cfg.storyboard.modes.r2s_s2s = 0.65, 0.0
    (run / "config.yaml").write_text(to_yaml(cfg))
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    before = _folder_bytes(out)
    assert main(["generate", str(story), "--run", str(run), "--out", str(out), "--regenerate", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "storyboard.modes.r2s_s2s" in err and "Traceback" not in err
    assert _folder_bytes(out) == before
    # The same run still draws what it trained: the r2s storyboard itself.
    assert main(["generate", str(story), "--run", str(run), "--out", str(tmp_path / "fresh")]) == 0


def test_base_model_differs_from_the_lora(generated, story, tmp_path):
    out = tmp_path / "base"
    config = str(tmp_path / "cfg.yaml")
    Path(config).write_text(to_yaml(Config()))
    assert main(["generate", str(story), "inference.steps=2", "--base", "--config", config, "--out", str(out)]) == 0
    assert json.loads((out / RECORD_FILE).read_text())["weights"] == "base"
    assert (out / shot_file(1)).read_bytes() != (generated / shot_file(1)).read_bytes()


def test_lora_from_safetensors_and_checkpoint(run_dir, tmp_path):
    _, saved = load_model(Config(), run_dir / "lora.safetensors")
    # A Lightning checkpoint holds the module's parameter names (peft adapter name included).
    state = {f"adapter.{name}": p for name, p in saved.named_parameters() if "lora_" in name}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    _, loaded = load_model(Config(), ckpt)
    expected = saved.lora_state_dict()
    for key, value in loaded.lora_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert any(value.abs().sum() > 0 for key, value in expected.items() if "lora_B" in key)


def test_lora_of_another_rank_is_one_line(story, run_dir, tmp_path, capsys):
    args = ["generate", str(story), "model.lora.rank=4", "--lora", str(run_dir / "lora.safetensors")]
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora.safetensors: the LoRA has rank 8, model.lora.rank=4" in err
    with pytest.raises(WeightsError, match="LoRA file not found"):
        load_model(Config(), tmp_path / "missing.safetensors")


def test_a_lora_file_outside_a_run_needs_a_config(story, run_dir, tmp_path, capsys):
    lora = tmp_path / "weights" / "my_lora.safetensors"
    lora.parent.mkdir()
    shutil.copy(run_dir / "lora.safetensors", lora)
    assert main(["generate", str(story), "--lora", str(lora), "--out", str(tmp_path / "out")]) == 2
    assert "pass --config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regenerate_needs_a_shot_of_the_story(story, run_dir, generated, capsys):
    args = ["generate", str(story), "--run", str(run_dir), "--out", str(generated), "--regenerate", "4"]
    assert main(args) == 2
    assert "shot 4, the story has 3" in capsys.readouterr().err


def test_example_story_draws_on_the_demo_toy_world(tmp_path):
    """examples/story.yaml points at toy group 0 as `make demo` writes it (outputs/demo/toyworld)."""
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE_STORY, tmp_path / "examples" / "story.yaml")
    manifest = ensure_toyworld(ToyWorldConfig(groups=1), tmp_path / "outputs" / "demo" / "toyworld")
    group = load_manifest(manifest)[0]
    story = load_story(tmp_path / "examples" / "story.yaml")
    assert [(r.image.resolve(), r.prompt) for r in story.references] == [(r.image, r.prompt) for r in group.references]


def _set(path: str, value):
    def mutate(body: dict) -> None:
        *parents, last = path.split(".")
        node = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _drop(key: str):
    return lambda body: body.pop(key)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (_drop("shots"), "shots"),
        (_set("shots", []), "shots"),
        (_set("shots.2.annotation", 3), "shots[2].annotation"),
        (_set("shots.1.annotation", " "), "shots[1].annotation"),
        (_set("references.0.prompt", ""), "references[0].prompt"),
        (_set("previous_shots", [{"image": "refs/role1.png", "annotation": ""}]), "previous_shots[0].annotation"),
        (_set("shots.1.image", "a.png"), "shots[1].image"),
        (_set("shots.0", "just a string"), "shots[0]"),
        (_set("references", {"role": "x"}), "references"),
        (_set("references.0.image", "refs/missing.png"), "references[0].image"),
        (_set("references.1.role", "role1"), "references[1].role"),
        (lambda body: body["references"][0].pop("prompt"), "references[0].prompt"),
        (_set("previous_shots", [{"image": "nope.png", "annotation": "a"}]), "previous_shots[0].image"),
        (_set("previous_shots", [{"image": "refs/role1.png"}]), "previous_shots[0].annotation"),
        (_drop("width"), "width"),
        (_set("height", 30), "height"),
        (_set("seed", "abc"), "seed"),
        (_set("steps", 0), "steps"),
        (_set("shot", []), "shot"),
    ],
)
def test_story_faults_name_the_field(tmp_path, mutate, field):
    body = json.loads(json.dumps(STORY))
    mutate(body)
    path = _write_story(tmp_path, body)
    with pytest.raises(DataError) as error:
        load_story(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{path}: {field}: ")


def test_story_file_faults(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("shots: [unclosed\n")
    with pytest.raises(DataError, match=r"bad\.yaml: not valid yaml"):
        load_story(bad_yaml)
    path = _write_story(tmp_path, STORY)
    (tmp_path / "refs" / "role1.png").write_bytes(b"not a png")
    story = load_story(path)
    with pytest.raises(DataError, match=r"story\.yaml: references\[0\]\.image: cannot read image"):
        reference_images(story, (HEIGHT, WIDTH))
    assert main(["generate", str(tmp_path / "absent.yaml"), "--base", "--out", str(tmp_path / "o")]) == 2
    assert "absent.yaml: cannot read story file" in capsys.readouterr().err


def test_make_generate_without_ckpt_says_it_draws_with_the_bare_model():
    repo = EXAMPLE_STORY.parents[1]
    dry = ["make", "-n", "-o", ".venv/.installed", "generate"]
    bare = subprocess.run(dry, cwd=repo, capture_output=True, text=True, check=True).stdout
    assert "no CKPT given: drawing with the bare model" in bare and "--base" in bare
    trained = subprocess.run([*dry, "CKPT=outputs/demo"], cwd=repo, capture_output=True, text=True, check=True).stdout
    assert "bare model" not in trained


def test_generate_help_states_the_precedence_it_refers_to(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "see precedence" not in text
    assert "the previous seed + 1, else the story's, else inference.seed" in text
    assert "the story's steps, else inference.steps" in text


def test_too_little_space_for_the_storyboard_is_reported_before_the_model_is_built(
    story, tmp_path, capsys, monkeypatch
):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    monkeypatch.setattr(generate_command, "load_model", lambda *a: pytest.fail("the model was built"))
    assert main(["generate", str(story), "--base", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "GiB free, the storyboard's images need about" in err
    assert not (tmp_path / "out").exists()


def test_the_recorded_config_samples_with_the_seed_and_steps_that_ran(story, run_dir, tmp_path):
    # The story sets seed 0 and the run's config 2 steps; the command line's take precedence, and so in the record.
    out = tmp_path / "out"
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(out), "--seed", "7", "--steps", "1"]) == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert (record["seed"], record["steps"]) == (7, 1)
    assert (record["config"]["inference"]["seed"], record["config"]["inference"]["steps"]) == (7, 1)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_preset_picks_the_sampler_setting_and_the_record_says_which(story, run_dir, generated, tmp_path, monkeypatch):
    forwards = []
    original = WanAdapter.predict_velocity

    def record(self, latents, timesteps, text, layout, **kwargs):
        forwards.append(latents.shape[0])
        return original(self, latents, timesteps, text, layout, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict_velocity", record)
    out = tmp_path / "fast"
    argv = ["generate", str(story), "--run", str(run_dir), "--out", str(out), "--preset", "fast", "--steps", "4"]
    assert main([*argv, "inference.guidance_fraction=0.25"]) == 0
    saved = json.loads((out / RECORD_FILE).read_text())
    assert saved["preset"]["name"] == "fast" and "inference.cache=first_block" in saved["preset"]["overrides"]
    inference = saved["config"]["inference"]
    # The preset's setting, with the command line's override applied after it.
    assert inference["cache"] == "first_block" and inference["guidance_fraction"] == 0.25
    assert forwards == [2, 1, 1, 1, 1]  # one guided step (the pair, v_u), then v_c alone

    out = tmp_path / "exact"
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(out), "--preset", "exact"]) == 0
    saved = json.loads((out / RECORD_FILE).read_text())
    assert saved["preset"]["name"] == "exact" and saved["config"]["inference"]["cache"] == "none"
    assert json.loads((generated / RECORD_FILE).read_text())["preset"] is None


@pytest.mark.parametrize("cache", ["none", "taylorseer"])
def test_a_cache_hook_named_after_a_preset_runs_with_its_own_options(cache, story, run_dir, tmp_path):
    # fast's {threshold: 0.1} are FirstBlockCache's options: with another hook they were refused, naming a key
    # the command line never set.
    out = tmp_path / "out"
    argv = ["generate", str(story), "--run", str(run_dir), "--out", str(out), "--preset", "fast", "--steps", "2"]
    assert main([*argv, f"inference.cache={cache}"]) == 0
    saved = json.loads((out / RECORD_FILE).read_text())
    inference = saved["config"]["inference"]
    assert (inference["cache"], inference["cache_options"], inference["guidance_fraction"]) == (cache, {}, 0.5)
    assert saved["preset"] == {
        "name": "fast",
        "overrides": ["inference.cache=first_block", "inference.guidance_fraction=0.5"],
    }


def test_the_summary_line_names_the_contact_sheet_where_it_is(story, run_dir, tmp_path, capsys):
    assert main(["generate", str(story), "--run", str(run_dir), "--out", str(tmp_path / "out"), "--steps", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"-> {tmp_path / 'out'} ({SHEET_FILE})") and (tmp_path / "out" / SHEET_FILE).is_file()


def test_a_folder_a_re_roll_was_killed_in_says_so_until_the_re_roll_is_run_again(
    generated, story, run_dir, tmp_path, monkeypatch
):
    """Killed after its new take of shot 2 is on disk, before its record: the record still lists take 1 of the
    earlier seed for shot_02.png, which is now another image. The folder is refused as a storyboard (animate reads
    it) and by a re-roll that would keep shot 2 as it is, until the re-roll of shot 2 runs again."""
    out = tmp_path / "out"
    shutil.copytree(generated, out)

    def killed(*args):
        raise KeyboardInterrupt

    argv = ["generate", str(story), "--run", str(run_dir), "--out", str(out), "--regenerate"]
    with monkeypatch.context() as patch:
        patch.setattr(generate_command, "write_record", killed)
        assert main([*argv, "2"]) == 130
    with pytest.raises(DataError, match=r"generation.json: a re-roll of shots 2 stopped before its record"):
        outputs.storyboard_shots(out)
    assert main([*argv, "3"]) == 2
    assert main([*argv, "2"]) == 0
    assert len(outputs.storyboard_shots(out)) == 3
    record = json.loads((out / RECORD_FILE).read_text())
    assert "rerolling" not in record and all("rerolling" not in earlier for earlier in record["history"])
