"""Validating parsed JSON / YAML records: typed field getters whose faults are one-line `DataError`s.

A `Where` knows the file, line and record being read; every check names the field path inside the record:
`<file>[:<line>]: [<noun> '<id>': ]<field path>: <what is wrong>`, e.g.
`data/manifest.jsonl:3: record 'toy-00002': shots[1].annotation: expected a string, got a number`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamshot.utils.errors import DataError
from dreamshot.utils.text import read_text

_JSON_NAMES: dict[type, str] = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}
# The same values in the words of someone writing YAML.
_YAML_NAMES = {**_JSON_NAMES, type(None): "nothing", list: "a list", dict: "a mapping"}
_REQUIRED = object()


def type_name(kind: type, yaml: bool = False) -> str:
    """What a JSON (or YAML) author calls values of type `kind`: "a string", "an array" (YAML: "a list"), ..."""
    return (_YAML_NAMES if yaml else _JSON_NAMES).get(kind, kind.__name__)


def _field_path(at: str, key: str) -> str:
    """`key` inside the field `at` ("shots[0]", "image" -> "shots[0].image"); `at` "" is the record itself."""
    return f"{at}.{key}" if at else key


@dataclass
class Where:
    """Where a fault is: file, line (JSON lines) and record; checks fields and raises one-line DataErrors.

    `record` is the id of the record being read ("?" until its id is known, None to leave it out); `yaml`
    picks YAML's type names.
    """

    path: Path
    line: int | None = None
    noun: str = "record"
    record: str | None = None
    yaml: bool = False

    def error(self, field: str, what: str) -> DataError:
        place = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        record = "" if self.record is None else f" {self.noun} {self.record!r}:"
        # Values quoted into the message (paths, YAML scalars) may hold line breaks; the CLI prints one line.
        return DataError(" ".join(f"{place}:{record} {field}: {what}".splitlines()))

    def check(self, value: Any, kind: type, field: str) -> Any:
        """`value` if it is a `kind` (a bool is not a number here), else a DataError naming `field`."""
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(field, f"expected {type_name(kind, self.yaml)}, got {type_name(type(value), self.yaml)}")
        return value

    def get(self, obj: dict[str, Any], key: str, kind: type, at: str = "", default: Any = _REQUIRED) -> Any:
        """`obj[key]` checked to be a `kind`; a missing key is a fault unless a `default` is given."""
        if key not in obj:
            if default is _REQUIRED:
                raise self.error(_field_path(at, key), "missing field")
            return default
        return self.check(obj[key], kind, _field_path(at, key))

    def identifier(self, obj: dict[str, Any], key: str, at: str = "") -> str:
        """A required, non-empty string field (an id, a role)."""
        value = self.get(obj, key, str, at)
        if not value:
            raise self.error(_field_path(at, key), "must not be empty")
        return value

    def reject_unknown(self, obj: dict[str, Any], known: Sequence[str], at: str = "") -> None:
        # A misspelt key ("annotaton") would otherwise be ignored or surface as a confusing "missing field".
        for key in obj:
            if key not in known:
                raise self.error(_field_path(at, key), f"unknown field (expected one of {', '.join(known)})")

    def reject_duplicates(self, values: Sequence[str], at: str, key: str) -> None:
        """Each of `values` (the `key` of each item of the list `at`) must differ from those before it."""
        seen: set[str] = set()
        for i, value in enumerate(values):
            if value in seen:
                raise self.error(f"{at}[{i}].{key}", f"duplicate {key} {value!r}")
            seen.add(value)

    def existing_file(self, value: Any, root: Path, field: str) -> Path:
        """`root / value` for a string `value` naming an existing file (absolute paths are taken as they are)."""
        path = root / self.check(value, str, field)
        if not value or not path.is_file():
            raise self.error(field, f"file not found: {path}")
        return path


def read_json_lines(path: Path, what: str, noun: str) -> Iterator[tuple[Where, dict[str, Any]]]:
    """Each non-blank line of the JSON-lines file `path` as an object, with the `Where` of its line.

    `what` names the file in read faults ("manifest"); each line holds one `noun` ("record") whose id the
    caller sets on its `Where` once it has read it.
    """
    lines = read_text(path, what).splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = Where(path, number, noun, record="?")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise where.error("(line)", f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise where.error("(line)", f"expected a JSON object, got {type_name(type(obj))}")
        yield where, obj
