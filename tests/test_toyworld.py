"""The toy world: deterministic, and its masks, prompts and annotations agree exactly with its pixels."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from dreamshot import cli
from dreamshot.config.load import load_config
from dreamshot.config.schema import ToyWorldConfig
from dreamshot.config.values import TOY_MAX_ROLES, TOY_MIN_SIDE
from dreamshot.data.manifest import StoryboardRecord, load_manifest
from dreamshot.data.toyworld import COLOURS, INKS, REFERENCE_BACKGROUND, ensure_toyworld, generate_toyworld
from dreamshot.utils.errors import ConfigError

SIZE = (48, 80)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[StoryboardRecord]:
    manifest = generate_toyworld(tmp_path_factory.mktemp("toy"), groups=16, seed=1, image_size=SIZE)
    return load_manifest(manifest)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _mask(path: Path) -> np.ndarray:
    values = _pixels(path)
    assert values.ndim == 2 and set(np.unique(values)) <= {0, 255}, path
    return values == 255


def _palette(prompt: str) -> tuple[set[tuple[int, ...]], tuple[int, ...]]:
    """(colours a character may show, its body colour), read from its prompt."""
    words = re.findall(r"[a-z]+", prompt)
    body = next(COLOURS[w] for w in words if w in COLOURS)
    inks = {INKS[w] for w in words if w in INKS}
    return {body, *inks}, body


def _colours(image: np.ndarray, where: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(c) for c in pixel) for pixel in image[where]}


def test_same_arguments_give_byte_identical_sets(tmp_path: Path) -> None:
    first = generate_toyworld(tmp_path / "a", groups=3, seed=5, image_size=SIZE)
    second = generate_toyworld(tmp_path / "b", groups=3, seed=5, image_size=SIZE)
    other_seed = generate_toyworld(tmp_path / "c", groups=3, seed=6, image_size=SIZE)
    assert _files(first.parent) == _files(second.parent)
    assert first.read_text() != other_seed.read_text()


def test_group_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    small = generate_toyworld(tmp_path / "small", groups=2, seed=5, image_size=SIZE)
    large = generate_toyworld(tmp_path / "large", groups=4, seed=5, image_size=SIZE)
    assert large.read_text().splitlines()[:2] == small.read_text().splitlines()
    assert _files(small.parent / "toy-00001") == _files(large.parent / "toy-00001")


def test_records_are_synthetic_with_ids_and_varied_framing(records) -> None:
    assert [r.id for r in records] == [f"toy-{i:05d}" for i in range(16)]
    assert {r.source for r in records} == {"synthetic"}
    annotations = " ".join(shot.annotation for r in records for shot in r.shots)
    for phrase in ("Close-up", "Medium shot", "Wide shot", "on the left", "on the right", "in the centre"):
        assert phrase in annotations
    assert any(len(shot.masks) < len(r.references) for r in records for shot in r.shots)  # absent roles


def test_reference_masks_are_exactly_the_character(records) -> None:
    for record in records:
        for ref in record.references:
            image, mask = _pixels(ref.image), _mask(ref.mask)
            assert image.shape[:2] == mask.shape == (min(SIZE), min(SIZE))
            allowed, body = _palette(ref.prompt)
            assert mask.any() and body in _colours(image, mask)
            assert _colours(image, mask) <= allowed
            assert _colours(image, ~mask) == {REFERENCE_BACKGROUND}


def test_shot_masks_hold_each_roles_visible_pixels(records) -> None:
    for record in records:
        palettes = {ref.role: _palette(ref.prompt) for ref in record.references}
        for shot in record.shots:
            image = _pixels(shot.image)
            assert image.shape == (*SIZE, 3)
            union = np.zeros(SIZE, dtype=int)
            for role, (allowed, body) in palettes.items():
                if role not in shot.masks:
                    # An absent role leaves no pixel of its body colour (body colours differ within a group).
                    assert body not in _colours(image, np.ones(SIZE, dtype=bool)), (record.id, role)
                    continue
                mask = _mask(shot.masks[role])
                assert mask.shape == SIZE and mask.any()
                assert _colours(image, mask) <= allowed and body in _colours(image, mask)
                union += mask
            assert union.max() <= 1, f"{record.id}: role masks overlap"


def test_occluded_roles_touch_but_keep_disjoint_visible_masks(records) -> None:
    occluded = 0
    for record in records:
        for shot in record.shots:
            found = re.search(r"(<Role \d+>) stands in front of (.+)\.$", shot.annotation)
            if not found:
                continue
            occluded += 1
            front = _mask(shot.masks[_role_id(found.group(1))])
            for tag in re.findall(r"<Role \d+>", found.group(2)):
                behind = _mask(shot.masks[_role_id(tag)])
                assert not (front & behind).any()
                assert (binary_dilation(front) & behind).any(), f"{record.id}: {shot.annotation}"
    assert occluded >= 2


def _role_id(tag: str) -> str:
    return "role" + re.search(r"\d+", tag).group()


def test_texts_name_exactly_the_roles_present(records) -> None:
    for record in records:
        for k, ref in enumerate(record.references):
            assert ref.prompt.startswith(f"<Role {k + 1}>: a ")
            assert ref.role == f"role{k + 1}"
        for shot in record.shots:
            named = {_role_id(tag) for tag in re.findall(r"<Role \d+>", shot.annotation)}
            assert named == set(shot.masks)
            assert record.style in shot.annotation


def test_every_role_appears_in_some_shot(records) -> None:
    for record in records:
        assert set().union(*(shot.masks for shot in record.shots)) == set(record.role_ids)


def test_ensure_toyworld_reuses_a_matching_set_and_regenerates_a_stale_one(tmp_path: Path) -> None:
    cfg = ToyWorldConfig(groups=2, seed=0, image_size=[32, 48])
    manifest = ensure_toyworld(cfg, tmp_path)
    params = json.loads((tmp_path / "toyworld.json").read_text())
    assert params["groups"] == 2 and params["image_size"] == [32, 48]
    stamp = manifest.stat().st_mtime_ns
    assert ensure_toyworld(cfg, tmp_path) == manifest and manifest.stat().st_mtime_ns == stamp
    cfg.groups = 3
    assert len(load_manifest(ensure_toyworld(cfg, tmp_path))) == 3


def test_bad_parameters_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_shots <= max_shots"):
        generate_toyworld(tmp_path, groups=1, seed=0, min_shots=4, max_shots=2)
    with pytest.raises(ConfigError, match="max_roles must be in 1..9"):
        generate_toyworld(tmp_path, groups=1, seed=0, max_roles=10)


def test_the_generator_and_the_configs_refuse_the_same_toy_worlds(tmp_path: Path) -> None:
    assert len(COLOURS) == TOY_MAX_ROLES  # one colour per role of a group
    faults = [
        ({"max_roles": TOY_MAX_ROLES + 1}, "max_roles must be in 1..9, got 10"),
        ({"image_size": [TOY_MIN_SIDE - 1, 80]}, "image_size[0] must be >= 16, got 15"),
        ({"groups": 0}, "groups must be >= 1, got 0"),
    ]
    for fault, message in faults:
        toy = {"groups": 1, "seed": 0, **fault}
        with pytest.raises(ConfigError) as generated:
            generate_toyworld(tmp_path / "never", **toy)
        assert str(generated.value) == message
        key, value = next(iter(fault.items()))
        for where in ("data.toy", "eval.toy"):
            with pytest.raises(ConfigError) as loaded:
                load_config("smoke", [f"{where}.{key}={value}".replace(" ", "")])
            assert str(loaded.value).startswith(f"{where}.{message}")
    assert not (tmp_path / "never").exists()


def test_real_share_adds_camera_noise_to_real_groups_only(tmp_path: Path) -> None:
    kwargs = {"groups": 8, "seed": 0, "image_size": (32, 48), "max_shots": 3}
    mixed = load_manifest(generate_toyworld(tmp_path / "mixed", real_share=0.5, **kwargs))
    clean = load_manifest(generate_toyworld(tmp_path / "clean", **kwargs))
    assert {r.source for r in clean} == {"synthetic"}
    assert 0 < sum(r.source == "real" for r in mixed) < len(mixed)
    for noisy, drawn in zip(mixed, clean, strict=True):
        for shot, same in zip(noisy.shots, drawn.shots, strict=True):
            assert shot.annotation == same.annotation
            for role, mask in shot.masks.items():
                assert np.array_equal(_pixels(mask), _pixels(same.masks[role]))
            difference = np.abs(_pixels(shot.image).astype(float) - _pixels(same.image)).mean()
            if noisy.source == "synthetic":
                assert difference == 0
            else:  # about 6 grey levels of Gaussian noise: mean |noise| = 6 * sqrt(2 / pi) = 4.8
                assert 3.5 < difference < 6


def test_real_share_outside_zero_one_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"real_share must be in \[0, 1\], got 1.5"):
        generate_toyworld(tmp_path, groups=1, seed=0, real_share=1.5)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture
def toyworld_cli_only(monkeypatch):
    # Only this subcommand's parser is built: the others are tested in their own files.
    monkeypatch.setattr(cli, "COMMANDS", {"toyworld": cli.COMMANDS["toyworld"]})


def test_cli_writes_the_manifest(tmp_path: Path, capsys, toyworld_cli_only) -> None:
    argv = ["toyworld", "--out", str(tmp_path), "--groups", "3", "--seed", "2", "--height", "32", "--width", "48"]
    assert cli.main([*argv, "--max-shots", "3", "--max-roles", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    records = load_manifest(tmp_path / "manifest.jsonl")
    assert out[0] == str(tmp_path / "manifest.jsonl")
    shots, refs = sum(len(r.shots) for r in records), sum(len(r.references) for r in records)
    assert out[1] == f"3 groups (0 real, 3 synthetic), {shots} shots, {refs} references"
    assert all(len(r.shots) <= 3 and len(r.references) <= 2 for r in records)
    assert Image.open(records[0].shots[0].image).size == (48, 32)


def test_cli_reports_bad_arguments_in_one_line(tmp_path: Path, capsys, toyworld_cli_only) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse's own error: the option's type holds the rule
        cli.main(["toyworld", "--out", str(tmp_path), "--max-roles", "0"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err == "dreamshot toyworld: error: argument --max-roles: expected an integer in 1..9, got 0\n"
    assert cli.main(["toyworld", "--out", str(tmp_path), "--min-shots", "5", "--max-shots", "3"]) == 2
    assert capsys.readouterr().err == "dreamshot toyworld: error: need min_shots <= max_shots, got 5 > 3\n"
    assert not any(tmp_path.iterdir())


def test_a_toy_world_rewritten_while_another_rank_reads_it_shows_that_rank_whole_files(tmp_path, monkeypatch):
    """torchrun and srun start every rank at once, and each writes the toy world of a fresh output folder."""
    manifest = generate_toyworld(tmp_path, 1, 0, (32, 48), 2, 2, 1)
    original, reads = Image.Image.save, []

    def save_while_read(image, fp, format=None, **params):
        encoded = io.BytesIO()
        original(image, encoded, format="PNG")
        data = encoded.getvalue()
        with open(fp, "wb") if isinstance(fp, (str, Path)) else contextlib.nullcontext(fp) as f:
            f.write(data[: len(data) // 2])
            f.flush()
            reads.append(load_manifest(manifest, check_files=True))  # another rank checks the set meanwhile
            f.write(data[len(data) // 2 :])

    monkeypatch.setattr(Image.Image, "save", save_while_read)
    generate_toyworld(tmp_path, 1, 0, (32, 48), 2, 2, 1)
    assert len(reads) > 2
