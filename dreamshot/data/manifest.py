"""The storyboard manifest (DESIGN §4): one JSON object per line, one storyboard group per object.

```
{"id": "toy-00001", "source": "synthetic", "style": "pastel meadow",
 "references": [{"role": "role1", "image": "toy-00001/ref_role1.png", "prompt": "<Role 1>: a red star",
                 "mask": "toy-00001/ref_role1_mask.png"}],
 "shots": [{"image": "toy-00001/shot_01.png", "annotation": "Close-up ...",
            "masks": {"role1": "toy-00001/shot_01_role1.png"}}]}
```

Paths are relative to the manifest's folder and may not leave it. `load_manifest` checks every record and
raises `DataError` with one line `<manifest>:<line>: record '<id>': <field>: <what is wrong>` at the first
fault. File checks read only image headers (PIL opens lazily) plus the PNG chunk checksums (`verify`), so
a manifest of thousands of groups loads quickly; pixel values (e.g. whether a mask is binary) are checked
when the dataset decodes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from dreamshot.data.sources import SOURCES
from dreamshot.utils.errors import DataError
from dreamshot.utils.fields import Where, read_json_lines
from dreamshot.utils.images import open_oriented, oriented_size
from dreamshot.utils.io import atomic_write_text

# Image modes that convert to RGB without losing meaning (16-bit, CMYK or float images do not).
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P")
MASK_MODES = ("L", "1")
_RECORD_FIELDS = ("id", "source", "style", "references", "shots")
_REFERENCE_FIELDS = ("role", "image", "prompt", "mask")
_SHOT_FIELDS = ("image", "annotation", "masks")


@dataclass(frozen=True)
class RoleRef:
    """One reference role: its id, image, prompt and mask (absolute paths)."""

    role: str
    image: Path
    prompt: str
    mask: Path


@dataclass(frozen=True)
class ShotRecord:
    """One shot: image, annotation and the mask of every role visible in it (role id -> absolute path)."""

    image: Path
    annotation: str
    masks: dict[str, Path]


@dataclass(frozen=True)
class StoryboardRecord:
    """One storyboard group. `root` is the manifest's folder; every path is absolute."""

    id: str
    source: str
    style: str
    references: list[RoleRef]
    shots: list[ShotRecord]
    root: Path

    @property
    def role_ids(self) -> list[str]:
        return [ref.role for ref in self.references]


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> list[StoryboardRecord]:
    """Read and validate a manifest. `check_files` also checks that every file exists with valid headers.

    Raises DataError (one line naming manifest, line, record id and field) at the first fault.
    """
    path = Path(path)
    root = path.absolute().parent
    records: list[StoryboardRecord] = []
    first_line: dict[str, int] = {}
    for where, obj in read_json_lines(path, "manifest", "record"):
        record = _parse_record(obj, root, where)
        if record.id in first_line:
            raise where.error("id", f"duplicate id (first on line {first_line[record.id]})")
        first_line[record.id] = where.line
        if check_files:
            _check_record_files(record, where)
        records.append(record)
    return records


def manifest_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a manifest's bytes: what latent caches and training checkpoints record of their data."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(records: list[StoryboardRecord], path: str | os.PathLike) -> None:
    """Write `records` atomically as a manifest at `path`, with paths relative to its folder."""
    path = Path(path)
    root = path.absolute().parent
    # ASCII JSON (non-ASCII escaped), so the file reads the same whatever the locale's encoding.
    lines = [json.dumps(_record_to_json(record, root)) for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --- parsing -----------------------------------------------------------------------------------------------


def _parse_record(obj: dict[str, Any], root: Path, where: Where) -> StoryboardRecord:
    record_id = where.identifier(obj, "id")
    where.record = record_id
    where.reject_unknown(obj, _RECORD_FIELDS)
    source = where.get(obj, "source", str)
    if source not in SOURCES:
        raise where.error("source", f"unknown source {source!r} (expected one of {', '.join(SOURCES)})")
    style = where.get(obj, "style", str)
    references = [
        _parse_reference(item, root, where, f"references[{i}]")
        for i, item in enumerate(where.get(obj, "references", list))
    ]
    where.reject_duplicates([ref.role for ref in references], "references", "role")
    shot_items = where.get(obj, "shots", list)
    if not shot_items:
        raise where.error("shots", "a record needs at least one shot")
    roles = {ref.role for ref in references}
    shots = [_parse_shot(item, roles, root, where, f"shots[{i}]") for i, item in enumerate(shot_items)]
    return StoryboardRecord(record_id, source, style, references, shots, root)


def _parse_reference(obj: Any, root: Path, where: Where, at: str) -> RoleRef:
    obj = where.check(obj, dict, at)
    where.reject_unknown(obj, _REFERENCE_FIELDS, at)
    role = where.identifier(obj, "role", at)
    image = _path(obj, "image", root, where, at)
    prompt = where.get(obj, "prompt", str, at)
    return RoleRef(role, image, prompt, _path(obj, "mask", root, where, at))


def _parse_shot(obj: Any, roles: set[str], root: Path, where: Where, at: str) -> ShotRecord:
    obj = where.check(obj, dict, at)
    where.reject_unknown(obj, _SHOT_FIELDS, at)
    image = _path(obj, "image", root, where, at)
    annotation = where.get(obj, "annotation", str, at)
    masks_obj = where.get(obj, "masks", dict, at)
    for role in masks_obj:
        if role not in roles:
            raise where.error(f"{at}.masks.{role}", "names a role with no reference in this record")
    masks = {role: _path(masks_obj, role, root, where, f"{at}.masks") for role in masks_obj}
    return ShotRecord(image, annotation, masks)


def _path(obj: dict[str, Any], key: str, root: Path, where: Where, at: str) -> Path:
    """The absolute path of a relative path field; rejects absolute paths and paths leaving `root`."""
    text = where.get(obj, key, str, at)
    at = f"{at}.{key}"
    if not text:
        raise where.error(at, "empty path")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise where.error(at, f"absolute path {text!r} (paths are relative to the manifest's folder)")
    # Checked on the text, not on resolved paths: a symlinked data folder is allowed, `..` is not.
    normal = PurePosixPath(os.path.normpath(text.replace("\\", "/")))
    if normal.parts[0] == "..":
        raise where.error(at, f"path {text!r} leaves the manifest's folder")
    return root / normal


# --- file checks (headers only) ----------------------------------------------------------------------------


def _check_record_files(record: StoryboardRecord, where: Where) -> None:
    for i, ref in enumerate(record.references):
        size = _check_image(ref.image, where, f"references[{i}].image")
        _check_mask(ref.mask, size, where, f"references[{i}].mask")
    for i, shot in enumerate(record.shots):
        size = _check_image(shot.image, where, f"shots[{i}].image")
        for role, mask in shot.masks.items():
            _check_mask(mask, size, where, f"shots[{i}].masks.{role}")


def _check_image(path: Path, where: Where, at: str) -> tuple[int, int]:
    size, mode = _image_header(path, where, at)
    if mode not in IMAGE_MODES:
        raise where.error(at, f"image {path} has mode {mode} (expected one of {', '.join(IMAGE_MODES)})")
    return size


def _check_mask(path: Path, image_size: tuple[int, int], where: Where, at: str) -> None:
    size, mode = _image_header(path, where, at)
    if mode not in MASK_MODES:
        raise where.error(at, f"mask {path} has mode {mode} (expected single-channel L or 1 with values 0/255)")
    if size != image_size:
        raise where.error(at, f"mask {path} is {size[0]}x{size[1]}, its image is {image_size[0]}x{image_size[1]}")
    # Masks are small: decoding them here catches what a header cannot show, before any training starts.
    values = np.asarray(open_oriented(path).convert("L"))
    if not ((values == 0) | (values == 255)).all():
        raise where.error(at, f"mask {path} has values other than 0 and 255")
    if not values.any():
        raise where.error(at, f"mask {path} is empty (a listed role must be visible)")


def _image_header(path: Path, where: Where, at: str) -> tuple[tuple[int, int], str]:
    """(width, height) as shown (EXIF orientation applied), mode of an image, after checking that its file is
    complete (`verify`)."""
    if not path.is_file():
        raise where.error(at, f"file not found: {path}")
    try:
        with Image.open(path) as image:
            size, mode = oriented_size(image), image.mode
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise where.error(at, f"unreadable image {path} ({e})") from None
    return size, mode


# --- writing -----------------------------------------------------------------------------------------------


def _record_to_json(record: StoryboardRecord, root: Path) -> dict[str, Any]:
    def rel(path: Path, at: str) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            raise DataError(f"record {record.id!r}: {at}: {path} is outside the manifest folder {root}") from None

    references = [
        {
            "role": ref.role,
            "image": rel(ref.image, f"references[{i}].image"),
            "prompt": ref.prompt,
            "mask": rel(ref.mask, f"references[{i}].mask"),
        }
        for i, ref in enumerate(record.references)
    ]
    shots = [
        {
            "image": rel(shot.image, f"shots[{i}].image"),
            "annotation": shot.annotation,
            "masks": {role: rel(mask, f"shots[{i}].masks.{role}") for role, mask in shot.masks.items()},
        }
        for i, shot in enumerate(record.shots)
    ]
    return {
        "id": record.id,
        "source": record.source,
        "style": record.style,
        "references": references,
        "shots": shots,
    }
