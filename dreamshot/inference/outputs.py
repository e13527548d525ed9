"""The output folder of `dreamshot generate`: shot PNGs, the contact sheet and `generation.json`.

Shots are `shot_01.png`, `shot_02.png`, … — ViStoryBench's naming: the shot index (1-based) is the number
after the last `_`. `storyboard.png` is the contact sheet (`contact_sheet.py`). `generation.json` records
the latest call (mode, seed, steps, weights, resolved config, timings per step and in total, which shots were
drawn and which kept) and, under `history`, the records of the calls before it in the same folder (re-rolls).
Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamshot.inference.contact_sheet import contact_sheet
from dreamshot.inference.story import Story, load_shot, reference_images
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import atomic_path, atomic_write_text
from dreamshot.utils.text import read_text

SHEET_FILE = "storyboard.png"
RECORD_FILE = "generation.json"


def shot_file(index: int) -> str:
    """File name of shot `index` (1-based)."""
    return f"shot_{index:02d}.png"


def shot_index(path: str | Path) -> int:
    """The 1-based shot index of a shot file name: the number after the last `_`."""
    return int(Path(path).stem.rsplit("_", 1)[-1])


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB image (rounded to 8 bits)."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_shots(out_dir: Path, indices: list[int], images: torch.Tensor) -> None:
    """Write `images` (len(indices), 3, H, W) in [0, 1] as the shot files of `indices`."""
    for index, pixels in zip(indices, images, strict=True):
        save_png(to_image(pixels), out_dir / shot_file(index))


def load_kept_shots(out_dir: Path, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
    """The shot files of `indices` as (len(indices), 3, H, W) in [-1, 1]; each must be `size` (H, W) already."""
    shots = []
    for index in indices:
        path = out_dir / shot_file(index)
        if not path.is_file():
            raise DataError(f"{path}: kept shot {index} not found (--regenerate needs the folder of an earlier run)")
        with Image.open(path) as image:
            found = image.size
        if found != (size[1], size[0]):
            raise DataError(f"{path}: kept shot is {found[0]}x{found[1]}, the story draws {size[1]}x{size[0]} (W x H)")
        shots.append(load_shot(path, size, str(path)))
    return torch.stack(shots) if shots else torch.zeros(0, 3, *size)


def write_contact_sheet(out_dir: Path, story: Story, size: tuple[int, int]) -> Path:
    """`storyboard.png` from the folder's shot files and the story's references and annotations."""
    shots = []
    for index in range(1, len(story.shots) + 1):
        with Image.open(out_dir / shot_file(index)) as image:
            shots.append(image.convert("RGB"))
    references = [to_image((ref + 1) / 2) for ref in reference_images(story, size)]
    sheet = contact_sheet(
        shots,
        [shot.annotation for shot in story.shots],
        references,
        [ref.prompt for ref in story.references],
    )
    path = out_dir / SHEET_FILE
    save_png(sheet, path)
    return path


def read_record(out_dir: Path) -> dict:
    """The folder's `generation.json`."""
    path = out_dir / RECORD_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (expected the output folder of `dreamshot generate`)")
    try:
        record = json.loads(read_text(path, "generation record"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not (isinstance(record, dict) and isinstance(record.get("seed"), int) and isinstance(record.get("shots"), list)):
        raise DataError(f"{path}: not a generation record (needs 'seed' and 'shots')")
    return record


def storyboard_shots(out_dir: Path) -> list[tuple[Path, str]]:
    """(image file, annotation) of every shot of the storyboard in `out_dir`, in order."""
    record, path = read_record(out_dir), out_dir / RECORD_FILE
    shots = []
    for i, shot in enumerate(record["shots"]):
        if not (isinstance(shot, dict) and all(isinstance(shot.get(key), str) for key in ("file", "annotation"))):
            raise DataError(f"{path}: shots[{i}]: expected a mapping with 'file' and 'annotation' strings")
        image = out_dir / shot["file"]
        if not image.is_file():
            raise DataError(f"{path}: shots[{i}].file: {image} not found")
        shots.append((image, shot["annotation"]))
    return shots


def write_record(out_dir: Path, record: dict, previous: dict | None = None) -> Path:
    """Write `record` as `generation.json`, keeping `previous` (and its history) under `history`."""
    history = []
    if previous is not None:
        history = [*previous.get("history", []), {k: v for k, v in previous.items() if k != "history"}]
    path = out_dir / RECORD_FILE
    atomic_write_text(path, json.dumps({**record, "history": history}, indent=2))
    return path
