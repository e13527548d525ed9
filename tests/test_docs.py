"""The docs name only config keys that exist: every dotted key in a code span or block of README.md, docs/*.md and
benchmarks/RESULTS.md whose first part is a section of the run `Config` (`trainer.max_steps`, `curriculum.0.steps`,
`logger.*`) must be a field of the schema."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from dreamshot.config.schema import Config

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
# Sections only (a dataclass or a list of them): a scalar field (`name`, `seed`) with a dot is prose or a file name.
SECTIONS = {
    name
    for name, kind in typing.get_type_hints(Config).items()
    if dataclasses.is_dataclass(kind)
    or (typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]))
}
# A dotted word not inside a path or a longer name; not a call (`model.eval()`) or a file (`storyboard.png`).
KEY = re.compile(r"(?<![\w/.$-])([a-z_]+(?:\.(?:[a-z0-9_]+|\*))+)(?![\w(])")
FILE_SUFFIXES = {"png", "jpg", "json", "jsonl", "yaml", "md", "py", "txt", "csv", "ckpt", "safetensors", "pth", "onnx"}


def code_spans(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return blocks + re.findall(r"`([^`]+)`", prose)


def config_keys(text: str) -> set[str]:
    """The dotted config keys named in the code of `text`."""
    keys = set()
    for span in code_spans(text):
        for key in KEY.findall(span):
            parts = key.split(".")
            if parts[0] in SECTIONS and parts[-1] not in FILE_SUFFIXES:
                keys.add(key)
    return keys


def is_schema_key(key: str) -> bool:
    """Whether `key` names a field of `Config` (a list entry by its index; `*`: any field below)."""
    kind: typing.Any = Config
    for part in key.split("."):
        if part == "*":
            return dataclasses.is_dataclass(kind)
        origin = typing.get_origin(kind)
        if origin is list and part.isdigit():
            kind = typing.get_args(kind)[0]
        elif origin is dict:  # free-form options (inference.cache_options): any key
            return True
        elif dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            if part not in hints:
                return False
            kind = _without_none(hints[part])
        else:
            return False
    return True


def _without_none(kind: typing.Any) -> typing.Any:
    """`X` of an optional field `X | None`."""
    if isinstance(kind, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return kind


def test_the_key_check_tells_keys_from_other_words():
    text = (
        "Set `trainer.max_stepz=5` or `curriculum.0.steps=15`, `logger.*`, `inference.cache_options.threshold`;\n"
        "not `outputs/dreamshot/x.py`, `model.eval()`, `storyboard.png`, `name.sub`.\n"
        "```\ndreamshot train smoke data.toy.groupz=3 eval.judge.model=gpt-4.1\n```\n"
    )
    keys = config_keys(text)
    assert keys == {
        "trainer.max_stepz",
        "curriculum.0.steps",
        "logger.*",
        "inference.cache_options.threshold",
        "data.toy.groupz",
        "eval.judge.model",
    }
    assert {key for key in keys if not is_schema_key(key)} == {"trainer.max_stepz", "data.toy.groupz"}


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_config_key_in_the_docs_exists(doc):
    keys = config_keys(doc.read_text(encoding="utf-8"))
    assert sorted(key for key in keys if not is_schema_key(key)) == []
