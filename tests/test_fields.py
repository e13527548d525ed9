"""The shared field checks of the manifest, story-file and benchmark loaders: one-line DataErrors naming where."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamshot.utils.errors import DataError
from dreamshot.utils.fields import Where, read_json_lines, type_name


def _message(check) -> str:
    with pytest.raises(DataError) as info:
        check()
    return str(info.value)


def test_error_names_file_line_record_and_field_on_one_line() -> None:
    where = Where(Path("data/m.jsonl"), 3, record="g-1")
    assert str(where.error("shots[0].image", "file not found:\nx.png")) == (
        "data/m.jsonl:3: record 'g-1': shots[0].image: file not found: x.png"
    )
    assert str(Where(Path("story.yaml")).error("seed", "bad")) == "story.yaml: seed: bad"
    assert str(Where(Path("t.jsonl"), 1, "story", "?").error("id", "bad")) == "t.jsonl:1: story '?': id: bad"


def test_type_names_follow_the_file_format() -> None:
    assert [type_name(kind) for kind in (dict, list, type(None), bool, float)] == [
        "an object",
        "an array",
        "null",
        "a boolean",
        "a number",
    ]
    assert [type_name(kind, yaml=True) for kind in (dict, list, type(None))] == ["a mapping", "a list", "nothing"]
    assert type_name(bytes) == "bytes"


def test_check_and_get_name_the_field_path() -> None:
    json_where, yaml_where = Where(Path("f")), Where(Path("f"), yaml=True)
    item = {"annotation": 5, "seed": True, "steps": 3}
    assert _message(lambda: json_where.get(item, "annotation", str, "shots[2]")) == (
        "f: shots[2].annotation: expected a string, got a number"
    )
    assert _message(lambda: yaml_where.check([1], dict, "shots[0]")) == "f: shots[0]: expected a mapping, got a list"
    # bool is an int subclass, but `true` is not a number to someone writing JSON or YAML.
    assert _message(lambda: json_where.get(item, "seed", int)) == "f: seed: expected a number, got a boolean"
    assert json_where.get(item, "steps", int) == 3
    assert _message(lambda: json_where.get(item, "prompt", str, "references[1]")) == (
        "f: references[1].prompt: missing field"
    )
    assert json_where.get(item, "prompt", str, default=None) is None


def test_identifier_unknown_and_duplicate_checks() -> None:
    where = Where(Path("f"))
    assert where.identifier({"role": "ana"}, "role", "references[0]") == "ana"
    assert _message(lambda: where.identifier({"id": ""}, "id")) == "f: id: must not be empty"
    assert _message(lambda: where.reject_unknown({"annotaton": "x"}, ("image", "annotation"), "shots[1]")) == (
        "f: shots[1].annotaton: unknown field (expected one of image, annotation)"
    )
    where.reject_unknown({"image": "a.png"}, ("image", "annotation"))
    assert _message(lambda: where.reject_duplicates(["a", "b", "a"], "references", "role")) == (
        "f: references[2].role: duplicate role 'a'"
    )
    where.reject_duplicates(["a", "b"], "references", "role")


def test_existing_file_resolves_against_the_root(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(b"")
    where = Where(Path("story.yaml"))
    assert where.existing_file("refs/a.png", tmp_path, "image") == tmp_path / "refs" / "a.png"
    assert where.existing_file(str(tmp_path / "refs" / "a.png"), Path("elsewhere"), "image").is_file()
    for value in ("refs/b.png", "refs", ""):
        assert _message(lambda v=value: where.existing_file(v, tmp_path, "image")).startswith(
            "story.yaml: image: file not found: "
        )
    assert _message(lambda: where.existing_file(7, tmp_path, "image")) == (
        "story.yaml: image: expected a string, got a number"
    )


def test_read_json_lines_skips_blank_lines_and_names_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": "a"}\n\n  \n{"id": "b"}\n')
    rows = list(read_json_lines(path, "manifest", "record"))
    assert [(where.line, where.record, obj) for where, obj in rows] == [(1, "?", {"id": "a"}), (4, "?", {"id": "b"})]
    path.write_text('{"id": "a"}\n["b"]\n')
    assert _message(lambda: list(read_json_lines(path, "manifest", "record"))) == (
        f"{path}:2: record '?': (line): expected a JSON object, got an array"
    )
    path.write_text('{"id": \n')
    assert "set.jsonl:1: story '?': (line): invalid JSON" in _message(
        lambda: list(read_json_lines(path, "test file", "story"))
    )
    path.write_bytes(b'{"id": "\xff"}\n')
    assert _message(lambda: list(read_json_lines(path, "manifest", "record"))) == (
        f"{path}: manifest is not UTF-8 text (byte 8); save it as UTF-8"
    )
    missing = tmp_path / "no.jsonl"
    assert "cannot read test file" in _message(lambda: list(read_json_lines(missing, "test file", "story")))
