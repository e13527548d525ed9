"""The contact sheet of a storyboard: a title (and legend), references in a column on the left, shots in a grid,
captions underneath.

Every panel (reference or shot) is scaled to `THUMB_WIDTH` pixels wide, keeping its aspect, and has room for
`CAPTION_LINES` lines of Pillow's default font under it; longer captions are cut, ending in "...". Shots are
numbered in their caption ("3. Close-up ...") by their place in the story (in s2s the given shots come first).
A shot may carry a tag ("given", "take 2"): its picture is framed in the tag's colour and the caption starts
with it. With ground truth, each row of shots is followed by the row of the true shots it should match.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

THUMB_WIDTH = 256
CAPTION_LINES = 4
PAD = 8
FRAME = 3
BACKGROUND = (255, 255, 255)
REFERENCE_BACKGROUND = (235, 235, 235)
TRUTH_BACKGROUND = (232, 244, 232)
TEXT = (20, 20, 20)
# Frame colours of the shot tags; any other tag gets DEFAULT_TAG_COLOUR.
TAG_COLOURS = {"given": (40, 90, 200), "ground truth": (30, 140, 60)}
DEFAULT_TAG_COLOUR = (230, 120, 0)
TRUTH_TAG = "ground truth"
Colour = tuple[int, int, int]


def panel_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of one panel for images of `image_size` (width, height), padding included."""
    width, height = image_size
    thumb_height = round(height * THUMB_WIDTH / width)
    return THUMB_WIDTH + 2 * PAD, thumb_height + _line_height() * CAPTION_LINES + 3 * PAD


def header_height(title: str = "", legend: Sequence[tuple[Colour, str]] = ()) -> int:
    """Height of the band above the panels: one line for the title, one per legend entry (0 without either)."""
    lines = bool(title) + len(legend)
    return lines * _line_height() + 2 * PAD if lines else 0


def contact_sheet(
    shots: Sequence[Image.Image],
    captions: Sequence[str],
    references: Sequence[Image.Image] = (),
    reference_captions: Sequence[str] = (),
    columns: int = 4,
    *,
    title: str = "",
    numbers: Sequence[int] | None = None,
    tags: Sequence[str] | None = None,
    ground_truth: Sequence[Image.Image | None] | None = None,
    legend: Sequence[tuple[Colour, str]] = (),
) -> Image.Image:
    """One RGB image: `title` and `legend` on top, a reference column (when there are references), then the
    shots, `columns` per row, each numbered by `numbers` (default 1..N) and tagged by `tags` ("" for none).
    `ground_truth` (one image or None per shot) adds, under every row of shots, the row of true shots.

    All images share one size (the story's shot size; references are letterboxed to it).
    """
    if len(shots) != len(captions) or len(references) != len(reference_captions):
        raise ValueError("every shot and reference needs exactly one caption")
    numbers = list(range(1, len(shots) + 1)) if numbers is None else list(numbers)
    tags = [""] * len(shots) if tags is None else list(tags)
    truth = None if ground_truth is None or all(image is None for image in ground_truth) else list(ground_truth)
    if len(numbers) != len(shots) or len(tags) != len(shots) or (truth is not None and len(truth) != len(shots)):
        raise ValueError("numbers, tags and ground_truth need one entry per shot")
    columns = min(columns, len(shots))
    panel_w, panel_h = panel_size(shots[0].size)
    ref_w = panel_w if references else 0
    rows_per_line = 2 if truth is not None else 1
    rows = math.ceil(len(shots) / columns) * rows_per_line
    top = header_height(title, legend)
    height = top + max(rows, len(references)) * panel_h
    sheet = Image.new("RGB", (ref_w + columns * panel_w, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _header(draw, title, legend, sheet.width - 2 * PAD)
    if references:
        sheet.paste(REFERENCE_BACKGROUND, (0, top, ref_w, sheet.height))
    for k, (image, caption) in enumerate(zip(references, reference_captions, strict=True)):
        _panel(sheet, draw, image, caption, (0, top + k * panel_h))
    for n, (image, caption) in enumerate(zip(shots, captions, strict=True)):
        line, column = divmod(n, columns)
        x, y = ref_w + column * panel_w, top + line * rows_per_line * panel_h
        _panel(sheet, draw, image, _caption(numbers[n], tags[n], caption), (x, y), tags[n])
        if truth is not None:
            sheet.paste(TRUTH_BACKGROUND, (x, y + panel_h, x + panel_w, y + 2 * panel_h))
            if truth[n] is None:
                _caption_lines(draw, f"{numbers[n]}. no ground truth", (x + PAD, y + panel_h + PAD))
            else:
                _panel(sheet, draw, truth[n], f"{numbers[n]}. [{TRUTH_TAG}]", (x, y + panel_h), TRUTH_TAG)
    return sheet


def tag_colour(tag: str) -> Colour:
    return TAG_COLOURS.get(tag, DEFAULT_TAG_COLOUR)


def _caption(number: int, tag: str, caption: str) -> str:
    return f"{number}. [{tag}] {caption}" if tag else f"{number}. {caption}"


def _header(draw: ImageDraw.ImageDraw, title: str, legend: Sequence[tuple[Colour, str]], width: int) -> None:
    y = PAD
    if title:
        draw.text((PAD, y), _fit(title, False, draw, width), fill=TEXT, font=_font())
        y += _line_height()
    side = _line_height() - 3
    for colour, text in legend:
        draw.rectangle((PAD, y + 1, PAD + side, y + 1 + side), fill=colour, outline=TEXT)
        draw.text((2 * PAD + side, y), _fit(text, False, draw, width - side - PAD), fill=TEXT, font=_font())
        y += _line_height()


def _panel(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, image: Image.Image, caption: str, origin, tag: str = ""
) -> None:
    x, y = origin
    thumb = image.convert("RGB").resize((THUMB_WIDTH, round(image.height * THUMB_WIDTH / image.width)), Image.BICUBIC)
    sheet.paste(thumb, (x + PAD, y + PAD))
    if tag:
        box = (x + PAD - FRAME, y + PAD - FRAME, x + PAD + thumb.width + FRAME - 1, y + PAD + thumb.height + FRAME - 1)
        draw.rectangle(box, outline=tag_colour(tag), width=FRAME)
    _caption_lines(draw, caption, (x + PAD, y + 2 * PAD + thumb.height))


def _caption_lines(draw: ImageDraw.ImageDraw, caption: str, origin) -> None:
    x, top = origin
    for i, line in enumerate(_wrap(caption, draw)):
        draw.text((x, top + i * _line_height()), line, fill=TEXT, font=_font())


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


def _fit(line: str, cut: bool, draw: ImageDraw.ImageDraw, width: int = THUMB_WIDTH) -> str:
    """`line` shortened to `width` pixels (a single long word can overflow), "..." where text is left out."""
    suffix = "..." if cut else ""
    while len(line) > 1 and draw.textlength(line + suffix, font=_font()) > width:
        line, suffix = line[:-1], "..."
    return line + suffix


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag")
    return bottom + 2
