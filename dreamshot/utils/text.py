"""Reading the text files users write (configs, story files, manifests, test files, benchmark JSON, records).

One rule everywhere: UTF-8, with or without a byte-order mark, or UTF-16 / UTF-32 with their byte-order mark
(what Windows editors and PowerShell redirections write). Anything else (Latin-1, UTF-16 without a mark) is
refused with one line naming the file and the first bad byte, as is a folder where a file is expected. YAML
mappings may not repeat a key: last-wins would silently drop the first value.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import yaml

from dreamshot.utils.errors import DataError, DreamShotError

# Checked in this order: the UTF-32-LE mark begins with the UTF-16-LE one.
_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text(path: str | Path, what: str, error: type[DreamShotError] = DataError) -> str:
    """The text of the file `path` (a `what`, e.g. "story file") under the rule above, or `error` naming it."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, expected a {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    encoding = next((name for mark, name in _MARKS if data.startswith(mark)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        label = "UTF-8" if encoding == "utf-8" else encoding.upper()
        raise error(f"{path}: {what} is not {label} text (byte {e.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise error(f"{path}: {what} holds NUL characters (UTF-16 without a byte-order mark?); save it as UTF-8")
    return text


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, path: str | Path, error: type[DreamShotError] = DataError) -> Any:
    """The YAML document `text` (read from `path`), duplicate keys refused; `error` names the file and line."""
    try:
        return yaml.load(text, Loader=_UniqueKeySafeLoader)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid yaml ({describe_yaml_error(e)})") from None


def read_yaml_file(path: str | Path, what: str, error: type[DreamShotError] = DataError) -> Any:
    return parse_yaml(read_text(path, what, error), path, error)


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """'duplicate key 'lr', line 3': the problem and where, on one line."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        return f"{e.problem}, line {mark.line + 1}" if mark is not None else e.problem
    return " ".join(str(e).split())
