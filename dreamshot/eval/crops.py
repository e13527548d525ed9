"""Where character crops come from (EVAL.md "CIDS"): the open-vocabulary detector, or the benchmark's role masks.

- `DetectorCrops`: each reference image of a character is cropped to its best "character" box; a reference with
  no detection is skipped, and only when every reference of the character is missed are the whole images used
  (as ViStoryBench does). A shot gives every detected box, best first, and the listed characters are assigned
  to them by the Hungarian algorithm on identity scores (ViStoryBench since December 2025).
- `MaskCrops`: the box around a role's mask; in a shot, the mask of character k gives the crop of character k
  (`fixed`: no assignment needed). Shot masks are drawn on the ground-truth shot, so they are mapped onto the
  generated image the way training maps shots to a resolution (cover, then centre crop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dreamshot.data.dataset import cover
from dreamshot.eval.benchmarks.types import BenchCharacter, BenchShot
from dreamshot.eval.detector import CharacterDetector
from dreamshot.eval.reading import open_as_published
from dreamshot.inference.story import open_rgb
from dreamshot.utils.errors import DataError
from dreamshot.utils.images import open_oriented

# (owner, crop): owner is the character key when the crop source knows it (masks), None for detections.
ShotCrop = tuple[str | None, Image.Image]


class DetectorCrops:
    fixed = False

    def __init__(self, detector: CharacterDetector) -> None:
        self.detector = detector

    def reference_crops(self, character: BenchCharacter) -> list[Image.Image]:
        images = [open_as_published(path, f"character {character.key!r}") for path in character.identity_images]
        crops = [crop for image in images for crop in self.detector.crops(image, 1)]
        return crops or images

    def shot_crops(self, image: Image.Image, shot: BenchShot) -> list[ShotCrop]:
        if not shot.characters:
            return []
        return [(None, crop) for crop in self.detector.crops(image)]


class MaskCrops:
    fixed = True

    def reference_crops(self, character: BenchCharacter) -> list[Image.Image]:
        crops = []
        for path, mask_path in zip(character.images, character.masks, strict=True):
            image = open_rgb(path, f"character {character.key!r}")
            box = None if mask_path is None else mask_box(_reference_mask(mask_path, image.size))
            crops.append(image.crop(box) if box else image)
        return crops

    def shot_crops(self, image: Image.Image, shot: BenchShot) -> list[ShotCrop]:
        crops = []
        for key in shot.characters:
            if key not in shot.masks:
                continue
            mask = cover(_open_mask(shot.masks[key]), (image.height, image.width), Image.NEAREST)
            box = mask_box(mask)
            if box is not None:
                crops.append((key, image.crop(box)))
        return crops


def mask_box(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """The (x0, y0, x1, y1) box around a mask's non-zero pixels; None for an empty mask."""
    rows, cols = np.nonzero(np.asarray(mask) > 0)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _open_mask(path: Path) -> Image.Image:
    try:
        return open_oriented(path).convert("L")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None


def _reference_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    mask = _open_mask(path)
    if mask.size != size:
        raise DataError(f"{path}: mask is {mask.size[0]}x{mask.size[1]}, its reference image {size[0]}x{size[1]}")
    return mask
