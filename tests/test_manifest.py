"""Manifest loading: a valid set round-trips; every kind of fault is one DataError line naming where it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamshot.data.manifest import StoryboardRecord, load_manifest, write_manifest
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.utils.errors import DataError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid two-group toy manifest (never modified: tests corrupt copies of it)."""
    return generate_toyworld(tmp_path_factory.mktemp("toy"), groups=2, seed=3, image_size=(32, 48))


@pytest.fixture
def manifest(pristine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    shutil.copytree(pristine.parent, folder)
    return folder / pristine.name


def _edit_second_record(manifest: Path, edit) -> None:
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[1])
    edit(record, manifest.parent)
    lines[1] = json.dumps(record)
    manifest.write_text("\n".join(lines) + "\n")


def _assert_one_line_error(manifest: Path, record_id: str, field: str, what: str) -> None:
    with pytest.raises(DataError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{manifest}:2: record {record_id!r}: {field}: "), message
    assert what in message, message


def test_valid_manifest_loads_with_absolute_paths(pristine: Path) -> None:
    records = load_manifest(pristine)
    assert [r.id for r in records] == ["toy-00000", "toy-00001"]
    for record in records:
        assert record.source == "synthetic" and record.root == pristine.parent.absolute()
        assert record.role_ids == [f"role{k + 1}" for k in range(len(record.references))]
        for shot in record.shots:
            assert shot.image.is_absolute() and shot.image.is_file()
            assert set(shot.masks) <= set(record.role_ids)


def test_write_manifest_round_trips_and_skips_blank_lines(manifest: Path) -> None:
    records = load_manifest(manifest)
    copy = manifest.parent / "copy.jsonl"
    write_manifest(records, copy)
    assert copy.read_text() == manifest.read_text()
    copy.write_text(manifest.read_text().replace("\n", "\n\n"))
    assert load_manifest(copy) == records


def test_write_manifest_rejects_files_outside_its_folder(pristine: Path, tmp_path: Path) -> None:
    records = load_manifest(pristine)
    with pytest.raises(DataError, match=r"record 'toy-00000': references\[0\]\.image: .* is outside"):
        write_manifest(records, tmp_path / "elsewhere" / "manifest.jsonl")


def test_check_files_false_skips_file_checks_but_not_path_checks(manifest: Path) -> None:
    record = load_manifest(manifest)[1]
    record.shots[0].image.unlink()
    assert isinstance(load_manifest(manifest, check_files=False)[1], StoryboardRecord)
    _edit_second_record(manifest, lambda r, _: r["shots"][0].update(image="../outside.png"))
    with pytest.raises(DataError, match="leaves the manifest's folder"):
        load_manifest(manifest, check_files=False)


def test_unreadable_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl: cannot read manifest"):
        load_manifest(tmp_path / "missing.jsonl")


def test_invalid_json_names_line(manifest: Path) -> None:
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    _assert_one_line_error(manifest, "?", "(line)", "invalid JSON")


def test_line_that_is_not_an_object(manifest: Path) -> None:
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + '\n["toy-00001"]\n')
    _assert_one_line_error(manifest, "?", "(line)", "expected a JSON object, got an array")


def _del_style(r, _):
    del r["style"]


def _set_annotation_number(r, _):
    r["shots"][0]["annotation"] = 5


def _set_masks_list(r, _):
    r["shots"][0]["masks"] = ["role1"]


def _unknown_source(r, _):
    r["source"] = "scraped"


def _duplicate_id(r, _):
    r["id"] = "toy-00000"


def _duplicate_role(r, _):
    r["references"].append(dict(r["references"][0]))


def _unknown_mask_role(r, _):
    r["shots"][0]["masks"]["ghost"] = r["references"][0]["mask"]


def _no_shots(r, _):
    r["shots"] = []


def _absolute_path(r, folder):
    r["shots"][0]["image"] = str(folder / r["shots"][0]["image"])


def _escaping_path(r, _):
    r["references"][0]["mask"] = "toy-00001/../../outside.png"


def _unknown_field(r, _):
    r["shots"][0]["annotaton"] = "typo"


def _missing_image(r, folder):
    (folder / r["shots"][0]["image"]).unlink()


def _missing_mask(r, folder):
    (folder / r["references"][0]["mask"]).unlink()


def _truncated_image(r, folder):
    path = folder / r["shots"][0]["image"]
    path.write_bytes(path.read_bytes()[:-40])


def _garbage_image(r, folder):
    (folder / r["references"][0]["image"]).write_bytes(b"not a png at all")


def _mask_wrong_size(r, folder):
    path = folder / r["references"][0]["mask"]
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(path)


def _mask_rgb(r, folder):
    path = folder / r["references"][0]["mask"]
    Image.open(path).convert("RGB").save(path)


FAULTS = [
    (_del_style, "style", "missing field"),
    (_set_annotation_number, "shots[0].annotation", "expected a string, got a number"),
    (_set_masks_list, "shots[0].masks", "expected an object, got an array"),
    (_unknown_source, "source", "unknown source 'scraped'"),
    (_duplicate_id, "id", "duplicate id (first on line 1)"),
    (_unknown_mask_role, "shots[0].masks.ghost", "names a role with no reference"),
    (_no_shots, "shots", "at least one shot"),
    (_absolute_path, "shots[0].image", "absolute path"),
    (_escaping_path, "references[0].mask", "leaves the manifest's folder"),
    (_unknown_field, "shots[0].annotaton", "unknown field"),
    (_missing_image, "shots[0].image", "file not found"),
    (_missing_mask, "references[0].mask", "file not found"),
    (_truncated_image, "shots[0].image", "unreadable image"),
    (_garbage_image, "references[0].image", "unreadable image"),
    (_mask_wrong_size, "references[0].mask", "is 7x5, its image is"),
    (_mask_rgb, "references[0].mask", "has mode RGB"),
]


@pytest.mark.parametrize(("corrupt", "field", "what"), FAULTS, ids=[f[0].__name__.strip("_") for f in FAULTS])
def test_fault_is_one_line_naming_manifest_line_record_and_field(manifest: Path, corrupt, field, what) -> None:
    _edit_second_record(manifest, corrupt)
    record_id = "toy-00000" if corrupt is _duplicate_id else "toy-00001"
    _assert_one_line_error(manifest, record_id, field, what)


def test_duplicate_role_names_the_second_reference(manifest: Path) -> None:
    _edit_second_record(manifest, _duplicate_role)
    with pytest.raises(DataError, match=r":2: record 'toy-00001': references\[\d+\]\.role: duplicate role 'role1'"):
        load_manifest(manifest)
