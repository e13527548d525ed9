"""Image files as the metrics read them: as ViStoryBench's metric code does, `Image.open(path).convert("RGB")`.

Everywhere else the project reads an image as a viewer shows it (`dreamshot.utils.images`: EXIF orientation
applied, transparent parts on white), which is what a model should be given. ViStoryBench's CIDS, CSD, AES and
judge see the stored pixels: no EXIF orientation, an alpha channel dropped (the colour under it kept). A
reference photo stored sideways with an orientation tag, or a shot with transparent parts, scores what it
scores there only when read the same way, so benchmark references and shots are read through here. (Role
masks are drawn on the image as shown, so `MaskCrops` reads a reference with its mask as a viewer does.)
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dreamshot.utils.images import read_image


def open_as_published(path: Path, where: str) -> Image.Image:
    """The stored pixels of an image file as RGB (module docstring); an unreadable file is a DataError naming
    `where`."""
    return read_image(path, where, _stored_rgb)


def _stored_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
