"""Opening user images as viewers show them: with their EXIF orientation applied, and transparent parts on white.
A phone stores a portrait photo sideways with an orientation tag; a mask drawn on the photo as shown must line up
with its pixels, so images and masks are both read through here (and their sizes, for the checks made from
headers). A character cut out on a transparent background is shown on the viewer's page; dropping the alpha
channel instead would show whatever colour the transparent pixels happen to hold (often black)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

from dreamshot.utils.errors import DataError

# EXIF orientations that turn the image by 90 degrees (its stored width is its shown height).
_QUARTER_TURNS = (5, 6, 7, 8)


def open_oriented(path: str | Path) -> Image.Image:
    """The decoded image at `path`, turned upright by its EXIF orientation (PIL's errors propagate)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)


def read_image(path: Path, where: str, decode: Callable[[Path], Image.Image]) -> Image.Image:
    """`decode(path)`; a file that cannot be decoded is a DataError naming `where`."""
    try:
        return decode(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot read image {path} ({' '.join(str(e).split())})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, transparent parts (an alpha channel, or a palette's transparent colour) laid on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened, not yet decoded image as it is shown (its header only)."""
    width, height = image.size
    # PIL decodes a PNG to look for EXIF after its pixels; EXIF before them (the usual place) is in `info`.
    if image.format == "PNG" and "exif" not in image.info:
        return width, height
    turned = image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS
    return (height, width) if turned else (width, height)
