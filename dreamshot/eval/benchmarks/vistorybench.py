"""ViStoryBench (EVAL.md "ViStoryBench data layout"), read from a local copy of the published dataset.

```
<root>/ViStory/<NN>/story.json
<root>/ViStory/<NN>/image/<character key>/00.jpg ...
```
story.json: `Story_type {en, ch}`; `Characters {key: {tag, name_en, name_ch, prompt_en, prompt_ch,
num_of_appearances}}`; `Shots [{index, "Plot Correspondence", "Setting Description", "Shot Perspective Design",
"Characters Appearing", "Static Shot Description"}]`, each text field `{en, ch}`; "Characters Appearing".en is a
list of character keys. English only. A character's reference images are the image files under its folder
(.jpg / .jpeg / .png in any case, sorted by path); a character that appears in a shot must have at least one.
CIDS reads only the `.jpg` files among them (lower case, as ViStoryBench's CIDS code globs them).

The storyboard model gets, per character, the prompt "<name_en>: <prompt_en>" with its first reference image,
and per shot "<Shot Perspective Design>. <Setting Description>. <Static Shot Description>." (each part ends
with one full stop).
Any fault is a DataError naming the story file and the field.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from dreamshot.eval.benchmarks.types import TAGS, BenchCharacter, Benchmark, BenchShot, BenchStory
from dreamshot.utils.errors import DataError
from dreamshot.utils.fields import Where
from dreamshot.utils.text import read_text

# fmt: off
LITE = ("01", "08", "09", "15", "17", "19", "24", "27", "28", "29",
        "32", "41", "52", "53", "55", "57", "60", "64", "68", "79")
# fmt: on
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The reference files ViStoryBench's CIDS reads (a case-sensitive glob, subfolders included).
CIDS_REFERENCE_PATTERN = "**/*.jpg"
SHOT_TEXTS = {
    "plot": "Plot Correspondence",
    "scene": "Setting Description",
    "camera": "Shot Perspective Design",
    "action": "Static Shot Description",
}
CHARACTER_TEXTS = ("name_en", "prompt_en")


def load_vistorybench(root: str | Path, split: str = "full") -> Benchmark:
    """The stories of the `full` set (every numbered folder) or the `lite` split under `root` (the folder
    holding `ViStory/`, or `ViStory/` itself)."""
    stories_dir = _stories_dir(Path(root))
    if split == "lite":
        names = list(LITE)
        absent = [name for name in names if not (stories_dir / name).is_dir()]
        if absent:
            raise DataError(f"{stories_dir}: lite split story {absent[0]} not found ({len(absent)} missing)")
    else:
        names = sorted((p.name for p in stories_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
    if not names:
        raise DataError(f"{stories_dir}: no story folders (expected ViStory/<NN>/story.json)")
    return Benchmark("vistorybench", tuple(load_story(stories_dir / name) for name in names))


def load_story(folder: Path) -> BenchStory:
    path = folder / "story.json"
    where = Where(path, noun="story", record=folder.name)
    body = _read_json(path, where)
    characters_obj = where.get(body, "Characters", dict)
    characters = {key: _character(folder, key, value, where) for key, value in characters_obj.items()}
    shots_list = where.get(body, "Shots", list)
    if not shots_list:
        raise where.error("Shots", "a story needs at least one shot")
    shots = tuple(_shot(item, i, characters, where) for i, item in enumerate(shots_list))
    indices = [shot.index for shot in shots]
    if len(set(indices)) != len(indices):
        raise where.error("Shots", f"duplicate shot index in {indices}")
    for i, shot in enumerate(shots):
        for key in shot.characters:
            if not characters[key].images:
                raise where.error(
                    f"Characters.{key}",
                    f"no reference image in {folder / 'image' / key} ({', '.join(IMAGE_SUFFIXES)}), "
                    f"but Shots[{i}] shows it",
                )
    return BenchStory(folder.name, characters, shots)


def _stories_dir(root: Path) -> Path:
    for candidate in (root / "ViStory", root):
        if candidate.is_dir() and any((p / "story.json").is_file() for p in candidate.iterdir() if p.is_dir()):
            return candidate
    raise DataError(f"{root}: no ViStoryBench stories found (expected {root}/ViStory/<NN>/story.json)")


def _character(folder: Path, key: str, value: Any, where: Where) -> BenchCharacter:
    at = f"Characters.{key}"
    value = where.check(value, dict, at)
    tag = where.get(value, "tag", str, at)
    if tag not in TAGS:
        raise where.error(f"{at}.tag", f"unknown tag {tag!r} (expected one of {', '.join(TAGS)})")
    name, prompt = (where.get(value, field, str, at) for field in CHARACTER_TEXTS)
    image_dir = folder / "image" / key
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() else []
    # glob, not Path.glob: its "**" skips hidden files and folders, as the published code's glob does.
    cids = sorted(glob.glob(CIDS_REFERENCE_PATTERN, root_dir=image_dir, recursive=True)) if image_dir.is_dir() else []
    return BenchCharacter(
        key, name, tag, f"{name}: {prompt}", tuple(images), (None,) * len(images), tuple(image_dir / p for p in cids)
    )


def _shot(item: Any, i: int, characters: dict[str, BenchCharacter], where: Where) -> BenchShot:
    at = f"Shots[{i}]"
    item = where.check(item, dict, at)
    index = where.get(item, "index", int, at)
    if isinstance(index, bool) or index < 1:
        raise where.error(f"{at}.index", f"expected a shot number >= 1, got {index!r}")
    texts = {
        name: where.get(where.get(item, field, dict, at), "en", str, f"{at}.{field}")
        for name, field in SHOT_TEXTS.items()
    }
    appearing = where.get(where.get(item, "Characters Appearing", dict, at), "en", list, f"{at}.Characters Appearing")
    for key in appearing:
        if key not in characters:
            raise where.error(f"{at}.Characters Appearing.en", f"{key!r} is not a key of Characters")
    prompt = sentences(texts["camera"], texts["scene"], texts["action"])
    return BenchShot(index, prompt, texts["scene"], texts["camera"], texts["action"], tuple(appearing))


def sentences(*parts: str) -> str:
    """Non-empty parts joined as sentences: each ends with a full stop unless it already ends a sentence."""
    parts = tuple(" ".join(part.split()) for part in parts)
    return " ".join(part if part.endswith((".", "!", "?")) else f"{part}." for part in parts if part)


def _read_json(path: Path, where: Where) -> dict[str, Any]:
    # Some published story files start with a byte-order mark: `read_text` accepts it, as everywhere.
    text = read_text(path, "story file")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return where.check(body, dict, "(file)")
