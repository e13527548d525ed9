"""The DreamShot test format (the paper's test set: references, shot texts, previous frames for s2s).

One JSON object per line, one story per object; paths are relative to the file's folder:
```
{"id": "story-001",
 "previous": 2,
 "characters": [{"key": "role1", "name": "<Role 1>", "tag": "realistic_human",
                 "prompt": "<Role 1>: a girl in a red coat",
                 "images": ["story-001/ref_role1.png"], "masks": ["story-001/ref_role1_mask.png"]}],
 "shots": [{"prompt": "Wide shot: <Role 1> at the station.", "characters": ["role1"],
            "image": "story-001/shot_01.png", "masks": {"role1": "story-001/shot_01_role1.png"},
            "scene": "a train station", "camera": "wide shot", "action": "<Role 1> waits on the platform"}]}
```
- `characters[].tag`: realistic_human (face encoders) | unrealistic_human | non_human (CLIP); `images`: one or
  more reference images; `masks` (optional): one mask per reference image.
- `shots[]`: shot n (1-based) is the n-th entry; `prompt` is what the model draws from; `characters` lists
  the keys of the characters in the shot; `image` is the ground-truth shot (required for the first `previous`
  shots); `masks` (optional) maps a character key to its mask in `image`; `scene`, `camera`, `action`
  (optional, default: `prompt`) are the texts the alignment judge checks.
- `previous` (optional, default 0): in s2s the first `previous` shots are given and the rest are drawn.

`manifest_to_test` converts a training manifest (DESIGN §4) into this format: a reference role becomes a
character (its name is the prompt's text before the first ':'), a shot's characters are the roles with a
mask in it. `python -m dreamshot.eval.benchmarks.dreamshot_test MANIFEST OUT.jsonl [--tag T] [--previous M]`
runs it. Any fault is a DataError `<file>:<line>: story '<id>': <field>: <what is wrong>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dreamshot.data.manifest import StoryboardRecord, load_manifest
from dreamshot.eval.benchmarks.types import TAGS, BenchCharacter, Benchmark, BenchShot, BenchStory
from dreamshot.utils.errors import DataError, DreamShotError
from dreamshot.utils.fields import Where, read_json_lines
from dreamshot.utils.io import atomic_write_text

_STORY_FIELDS = ("id", "previous", "characters", "shots")
_CHARACTER_FIELDS = ("key", "name", "tag", "prompt", "images", "masks")
_SHOT_FIELDS = ("prompt", "characters", "image", "masks", "scene", "camera", "action")


def load_dreamshot_test(path: str | Path, name: str = "dreamshot_test") -> Benchmark:
    """Read and validate a test file; every image path must name an existing file."""
    path = Path(path)
    stories: list[BenchStory] = []
    seen: set[str] = set()
    for where, body in read_json_lines(path, "test file", "story"):
        story = _story(body, path.absolute().parent, where)
        if story.id in seen:
            raise where.error("id", "duplicate story id")
        seen.add(story.id)
        stories.append(story)
    if not stories:
        raise DataError(f"{path}: no stories")
    return Benchmark(name, tuple(stories))


def manifest_to_test(manifest: str | Path, out: str | Path, tag: str = "non_human", previous: int = 1) -> Path:
    """Write the test file `out` for the groups of `manifest`; `previous` is capped at each story's shots - 1."""
    if tag not in TAGS:
        raise DataError(f"tag must be one of {', '.join(TAGS)}, got {tag!r}")
    out = Path(out)
    root = out.absolute().parent
    lines = [json.dumps(record_to_test(record, root, tag, previous)) for record in load_manifest(manifest)]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return out


def record_to_test(record: StoryboardRecord, root: Path, tag: str, previous: int) -> dict[str, Any]:
    """One manifest record as a test-file story, paths relative to `root`."""

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    roles = record.role_ids
    characters = [
        {
            "key": ref.role,
            "name": ref.prompt.split(":", 1)[0].strip() if ":" in ref.prompt else ref.role,
            "tag": tag,
            "prompt": ref.prompt,
            "images": [rel(ref.image)],
            "masks": [rel(ref.mask)],
        }
        for ref in record.references
    ]
    shots = [
        {
            "prompt": shot.annotation,
            "characters": [role for role in roles if role in shot.masks],
            "image": rel(shot.image),
            "masks": {role: rel(mask) for role, mask in shot.masks.items()},
        }
        for shot in record.shots
    ]
    return {"id": record.id, "previous": min(previous, len(shots) - 1), "characters": characters, "shots": shots}


# --- parsing -----------------------------------------------------------------------------------------------


def _story(body: dict[str, Any], root: Path, where: Where) -> BenchStory:
    story_id = where.identifier(body, "id")
    where.record = story_id
    where.reject_unknown(body, _STORY_FIELDS)
    character_list = [
        _character(where.check(item, dict, f"characters[{i}]"), root, where, f"characters[{i}]")
        for i, item in enumerate(where.get(body, "characters", list))
    ]
    where.reject_duplicates([character.key for character in character_list], "characters", "key")
    characters = {character.key: character for character in character_list}
    shot_items = where.get(body, "shots", list)
    if not shot_items:
        raise where.error("shots", "a story needs at least one shot")
    shots = tuple(
        _shot(where.check(item, dict, f"shots[{i}]"), i + 1, characters, root, where, f"shots[{i}]")
        for i, item in enumerate(shot_items)
    )
    previous = where.get(body, "previous", int, default=0)
    if not 0 <= previous < len(shots):
        raise where.error("previous", f"must be in 0..{len(shots) - 1} (the story has {len(shots)} shots)")
    for shot in shots[:previous]:
        if shot.image is None:
            raise where.error(f"shots[{shot.index - 1}].image", "a previous shot (s2s condition) needs its image")
    return BenchStory(story_id, characters, shots, previous)


def _character(item: dict, root: Path, where: Where, at: str) -> BenchCharacter:
    where.reject_unknown(item, _CHARACTER_FIELDS, at)
    key = where.identifier(item, "key", at)
    tag = where.get(item, "tag", str, at)
    if tag not in TAGS:
        raise where.error(f"{at}.tag", f"unknown tag {tag!r} (expected one of {', '.join(TAGS)})")
    images = [
        where.existing_file(text, root, f"{at}.images[{k}]")
        for k, text in enumerate(where.get(item, "images", list, at))
    ]
    if not images:
        raise where.error(f"{at}.images", "a character needs at least one reference image")
    masks = where.get(item, "masks", list, at, default=None)
    if masks is not None and len(masks) != len(images):
        raise where.error(f"{at}.masks", f"{len(masks)} masks for {len(images)} images (one per image)")
    mask_paths = [where.existing_file(text, root, f"{at}.masks[{k}]") for k, text in enumerate(masks or [])]
    return BenchCharacter(
        key,
        where.get(item, "name", str, at, default=key),
        tag,
        where.get(item, "prompt", str, at),
        tuple(images),
        tuple(mask_paths) if masks is not None else (None,) * len(images),
    )


def _shot(item: dict, index: int, characters: dict, root: Path, where: Where, at: str) -> BenchShot:
    where.reject_unknown(item, _SHOT_FIELDS, at)
    prompt = where.get(item, "prompt", str, at)
    keys = where.get(item, "characters", list, at)
    for k, key in enumerate(keys):
        if key not in characters:
            raise where.error(f"{at}.characters[{k}]", f"{key!r} is not a character key of this story")
    image = item.get("image")
    masks = where.get(item, "masks", dict, at, default={})
    for key in masks:
        if key not in characters:
            raise where.error(f"{at}.masks.{key}", "names no character of this story")
    return BenchShot(
        index=index,
        prompt=prompt,
        scene=where.get(item, "scene", str, at, default=prompt),
        camera=where.get(item, "camera", str, at, default=prompt),
        action=where.get(item, "action", str, at, default=prompt),
        characters=tuple(keys),
        image=None if image is None else where.existing_file(image, root, f"{at}.image"),
        masks={key: where.existing_file(text, root, f"{at}.masks.{key}") for key, text in masks.items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a DreamShot manifest into the DreamShot test format.")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path, help="test file to write (.jsonl)")
    parser.add_argument("--tag", default="non_human", choices=TAGS, help="tag of every character")
    parser.add_argument("--previous", type=int, default=1, help="shots given as previous frames in s2s")
    args = parser.parse_args(argv)
    try:
        print(manifest_to_test(args.manifest, args.out, args.tag, args.previous))
    except DreamShotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
