"""Story files: what `dreamshot generate` draws. YAML (or JSON, which is YAML), paths relative to the file.

```yaml
seed: 7                  # optional: noise seed (else inference.seed)
steps: 30                # optional: sampler steps (else inference.steps)
height: 480              # optional, with width: shot size in pixels, multiples of 16 (else data.resolution)
width: 832
references:              # optional: one image and prompt per role -> r2s
  - {role: ana, image: refs/ana.png, prompt: "<Role 1>: a girl in a red coat"}
previous_shots:          # optional: shots already drawn, kept clean as conditions -> s2s (with references: r2s_s2s)
  - {image: earlier/shot_01.png, annotation: "Wide shot: <Role 1> at the station."}
shots:                   # the shots to draw, in order (at least one)
  - {annotation: "Close-up: <Role 1> looks at the train."}
```

`load_story` validates everything before a model is built and raises `DataError` with one line
`<story file>: <field>: <what is wrong>` (e.g. `shots[2].annotation: expected a string, got a number`).
Images are prepared the way the training data is (`dreamshot.data.dataset`): references letterboxed onto a
white canvas at the shot size, shots resized to cover it and centre-cropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamshot.config.values import INT64_MAX, SEED_LIMIT
from dreamshot.data.dataset import WHITE, cover, letterbox
from dreamshot.inference.pipeline import StoryboardRequest
from dreamshot.utils.fields import Where
from dreamshot.utils.images import open_oriented, read_image, to_rgb
from dreamshot.utils.text import read_yaml_file

_TOP_FIELDS = ("seed", "steps", "height", "width", "references", "previous_shots", "shots")
_REFERENCE_FIELDS = ("role", "image", "prompt")
_PREVIOUS_FIELDS = ("image", "annotation")
_SHOT_FIELDS = ("annotation",)
SIZE_MULTIPLE = 16
# How annotations and reference prompts name a role (the toy world's and the paper's convention).
ROLE_TAG = re.compile(r"<Role \d+>")


@dataclass(frozen=True)
class StoryRole:
    """A reference role: its id, image (absolute path) and prompt."""

    role: str
    image: Path
    prompt: str


@dataclass(frozen=True)
class StoryShot:
    """A shot annotation; `image` is set for previous shots (absolute path) and None for shots to draw."""

    annotation: str
    image: Path | None = None


@dataclass(frozen=True)
class Story:
    path: Path
    references: list[StoryRole]
    previous_shots: list[StoryShot]
    shots: list[StoryShot]
    seed: int | None = None
    steps: int | None = None
    # (height, width) in pixels, or None for the config's `data.resolution`.
    size: tuple[int, int] | None = None


def load_story(path: str | os.PathLike) -> Story:
    """Read and validate a story file; every image path must name an existing file."""
    path = Path(path)
    where = Where(path, yaml=True)
    body = _read(path, where)
    root = path.absolute().parent
    where.reject_unknown(body, _TOP_FIELDS)
    references = [
        StoryRole(where.identifier(item, "role", at), _image(item, root, where, at), _text(item, "prompt", where, at))
        for at, item in _objects(body, "references", _REFERENCE_FIELDS, where)
    ]
    where.reject_duplicates([ref.role for ref in references], "references", "role")
    previous = [
        StoryShot(_text(item, "annotation", where, at), _image(item, root, where, at))
        for at, item in _objects(body, "previous_shots", _PREVIOUS_FIELDS, where)
    ]
    shots = [
        StoryShot(_text(item, "annotation", where, at)) for at, item in _objects(body, "shots", _SHOT_FIELDS, where)
    ]
    if not shots:
        raise where.error("shots", "a story needs at least one shot to draw")
    return Story(
        path=path,
        references=references,
        previous_shots=previous,
        shots=shots,
        seed=_integer(body, "seed", 0, where, maximum=SEED_LIMIT - 1),
        steps=_integer(body, "steps", 1, where),
        size=_size(body, where),
    )


def unreferenced_roles(story: Story) -> list[str]:
    """A warning for every `<Role N>` an annotation names that no reference prompt names, when the story has
    references (r2s, s2s): such a role is drawn from its text alone, which is rarely what was meant."""
    if not story.references:
        return []
    shown = {tag for ref in story.references for tag in ROLE_TAG.findall(ref.prompt)}
    fields = [(f"previous_shots[{m}]", shot) for m, shot in enumerate(story.previous_shots)]
    fields += [(f"shots[{n}]", shot) for n, shot in enumerate(story.shots)]
    return [
        f"{story.path}: {at}.annotation names {tag}, which no reference shows"
        for at, shot in fields
        for tag in dict.fromkeys(ROLE_TAG.findall(shot.annotation))
        if tag not in shown
    ]


def story_request(
    story: Story,
    size: tuple[int, int],
    targets: Sequence[int] | None = None,
    kept: torch.Tensor | None = None,
    earlier_takes: torch.Tensor | None = None,
) -> StoryboardRequest:
    """The pipeline request that draws shots `targets` (1-based; default all) of `story` at `size` (H, W).

    Every other shot is a kept shot (re-roll): its image is in `kept`, (N − len(targets), 3, H, W) in [-1, 1]
    in story order. Kept shots join the given shots after the story's previous shots, so in the sequence they
    stand in the condition slot after the references, with their own annotations, like the given shots of s2s
    training; the shots to draw are the targets, in story order. Every shot keeps its story position: P previous
    shots take 0..P-1 and shot n of the story takes P + n - 1, kept or drawn. `earlier_takes`: the targets'
    current images (len(targets), 3, H, W), encoded only as the kept shots' context (`StoryboardRequest`).
    """
    count, previous = len(story.shots), len(story.previous_shots)
    targets = list(range(1, count + 1)) if targets is None else sorted(targets)
    kept_indices = [n for n in range(1, count + 1) if n not in targets]
    kept = torch.zeros(0, 3, *size) if kept is None else kept
    if kept.shape[0] != len(kept_indices):
        raise ValueError(f"{len(kept_indices)} kept shots but {kept.shape[0]} kept images")
    given = torch.cat([previous_shot_images(story, size), kept])
    given_texts = [shot.annotation for shot in story.previous_shots]
    given_texts += [story.shots[n - 1].annotation for n in kept_indices]
    return StoryboardRequest(
        shot_texts=[story.shots[n - 1].annotation for n in targets],
        size=size,
        references=reference_images(story, size),
        reference_texts=[ref.prompt for ref in story.references],
        given_shots=given,
        given_texts=given_texts,
        given_positions=list(range(previous)) + [previous + n - 1 for n in kept_indices],
        shot_positions=[previous + n - 1 for n in targets],
        earlier_takes=earlier_takes,
    )


# --- images ------------------------------------------------------------------------------------------------


def reference_images(story: Story, size: tuple[int, int]) -> torch.Tensor:
    """(K, 3, H, W) in [-1, 1]: each reference letterboxed on white at `size` (H, W), as in training."""
    images = []
    for k, ref in enumerate(story.references):
        image = open_rgb(ref.image, f"{story.path}: references[{k}].image")
        images.append(image_to_tensor(letterbox(image, size, Image.BICUBIC, WHITE)))
    return _stack(images, size)


def previous_shot_images(story: Story, size: tuple[int, int]) -> torch.Tensor:
    """(M, 3, H, W) in [-1, 1]: each previous shot resized to cover `size` (H, W) and centre-cropped."""
    images = [
        load_shot(shot.image, size, f"{story.path}: previous_shots[{m}].image")
        for m, shot in enumerate(story.previous_shots)
    ]
    return _stack(images, size)


def load_shot(path: Path, size: tuple[int, int], where: str) -> torch.Tensor:
    """One shot image -> (3, H, W) in [-1, 1], covering `size` (an image already at `size` is unchanged)."""
    return image_to_tensor(cover(open_rgb(path, where), size, Image.BICUBIC))


def open_rgb(path: Path, where: str) -> Image.Image:
    """Decode an image file as RGB (`to_rgb`: transparent parts on white), EXIF orientation applied; an unreadable
    file is a DataError naming `where`."""
    return read_image(path, where, lambda file: to_rgb(open_oriented(file)))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float32 in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _stack(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.stack(images) if images else torch.zeros(0, 3, *size)


# --- parsing -----------------------------------------------------------------------------------------------


def _read(path: Path, where: Where) -> dict[str, Any]:
    return where.check(read_yaml_file(path, "story file"), dict, "(file)")


def _objects(body: dict[str, Any], key: str, known: tuple[str, ...], where: Where) -> list[tuple[str, dict[str, Any]]]:
    """The optional list of mappings `body[key]`, each with its field path (`shots[2]`), unknown keys rejected."""
    items = []
    for i, item in enumerate(where.get(body, key, list, default=[])):
        at = f"{key}[{i}]"
        where.reject_unknown(where.check(item, dict, at), known, at)
        items.append((at, item))
    return items


def _image(item: dict[str, Any], root: Path, where: Where, at: str) -> Path:
    return where.existing_file(where.get(item, "image", str, at), root, f"{at}.image")


def _text(item: dict[str, Any], key: str, where: Where, at: str) -> str:
    """A prompt or annotation. A blank one is a slip: the frame would be drawn from no text (and with the default,
    empty negative prompt its text guidance would vanish: v_c = v_r)."""
    value = where.get(item, key, str, at)
    if not value.strip():
        raise where.error(f"{at}.{key}", "must not be blank")
    return value


def _integer(body: dict[str, Any], key: str, minimum: int, where: Where, maximum: int = INT64_MAX) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int subclass: `seed: yes` must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        wanted = f">= {minimum}" if maximum == INT64_MAX else f"in {minimum}..{maximum}"
        raise where.error(key, f"expected an integer {wanted}, got {value!r}")
    return value


def _size(body: dict[str, Any], where: Where) -> tuple[int, int] | None:
    given = [key for key in ("height", "width") if body.get(key) is not None]
    if not given:
        return None
    if len(given) == 1:
        missing = "width" if given == ["height"] else "height"
        raise where.error(missing, "give both height and width, or neither")
    sides = []
    for key in ("height", "width"):
        value = _integer(body, key, SIZE_MULTIPLE, where)
        if value % SIZE_MULTIPLE:
            raise where.error(key, f"must be a multiple of {SIZE_MULTIPLE} (VAE 8x, patch 2x), got {value}")
        sides.append(value)
    return sides[0], sides[1]
