"""The contact sheet of a storyboard: references in a column on the left, shots in a grid, captions underneath.

Every panel (reference or shot) is scaled to `THUMB_WIDTH` pixels wide, keeping its aspect, and has room for
`CAPTION_LINES` lines of Pillow's default font under it; longer captions are cut, ending in "...". Shots are
numbered from 1 in their caption ("3. Close-up ...").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

THUMB_WIDTH = 256
CAPTION_LINES = 4
PAD = 8
BACKGROUND = (255, 255, 255)
REFERENCE_BACKGROUND = (235, 235, 235)
TEXT = (20, 20, 20)


def panel_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of one panel for images of `image_size` (width, height), padding included."""
    width, height = image_size
    thumb_height = round(height * THUMB_WIDTH / width)
    return THUMB_WIDTH + 2 * PAD, thumb_height + _line_height() * CAPTION_LINES + 3 * PAD


def contact_sheet(
    shots: Sequence[Image.Image],
    captions: Sequence[str],
    references: Sequence[Image.Image] = (),
    reference_captions: Sequence[str] = (),
    columns: int = 4,
) -> Image.Image:
    """One RGB image: a reference column (when there are references), then the shots, `columns` per row.

    All images share one size (the story's shot size; references are letterboxed to it).
    """
    if len(shots) != len(captions) or len(references) != len(reference_captions):
        raise ValueError("every shot and reference needs exactly one caption")
    columns = min(columns, len(shots))
    panel_w, panel_h = panel_size(shots[0].size)
    ref_w = panel_w if references else 0
    rows = math.ceil(len(shots) / columns)
    sheet = Image.new("RGB", (ref_w + columns * panel_w, max(rows, len(references)) * panel_h), BACKGROUND)
    if references:
        sheet.paste(REFERENCE_BACKGROUND, (0, 0, ref_w, sheet.height))
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(zip(references, reference_captions, strict=True)):
        _panel(sheet, draw, image, caption, (0, k * panel_h))
    for n, (image, caption) in enumerate(zip(shots, captions, strict=True)):
        row, column = divmod(n, columns)
        _panel(sheet, draw, image, f"{n + 1}. {caption}", (ref_w + column * panel_w, row * panel_h))
    return sheet


def _panel(sheet: Image.Image, draw: ImageDraw.ImageDraw, image: Image.Image, caption: str, origin) -> None:
    x, y = origin
    thumb = image.convert("RGB").resize((THUMB_WIDTH, round(image.height * THUMB_WIDTH / image.width)), Image.BICUBIC)
    sheet.paste(thumb, (x + PAD, y + PAD))
    top = y + 2 * PAD + thumb.height
    for i, line in enumerate(_wrap(caption, draw)):
        draw.text((x + PAD, top + i * _line_height()), line, fill=TEXT, font=_font())


def _wrap(caption: str, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to THUMB_WIDTH pixels, at most CAPTION_LINES lines; "..." marks text left out."""
    lines: list[str] = []
    for word in caption.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=_font()) <= THUMB_WIDTH:
            lines[-1] = candidate
        else:
            lines.append(word)
    cut = len(lines) > CAPTION_LINES
    lines = lines[:CAPTION_LINES]
    return [_fit(line, cut and i == len(lines) - 1, draw) for i, line in enumerate(lines)]


def _fit(line: str, cut: bool, draw: ImageDraw.ImageDraw) -> str:
    """`line` shortened to THUMB_WIDTH pixels (a single long word can overflow), "..." where text is left out."""
    suffix = "..." if cut else ""
    while len(line) > 1 and draw.textlength(line + suffix, font=_font()) > THUMB_WIDTH:
        line, suffix = line[:-1], "..."
    return line + suffix


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag")
    return bottom + 2
