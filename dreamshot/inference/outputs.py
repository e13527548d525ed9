"""The output folder of `dreamshot generate`: shot PNGs, the contact sheet and `generation.json`.

Shots are `shot_01.png`, `shot_02.png`, … — ViStoryBench's naming: the shot index (1-based) is the number
after the last `_`. `sheet/storyboard.png` is the contact sheet (`contact_sheet.py`), in a subfolder so that
ViStoryBench's output reader, which takes every image file beside the shots for a shot, never sees it (it
stops on `storyboard.png`, which has no shot number): titled with the mode, seed, steps and weights, an s2s
story's given shots first (tagged), every shot numbered by its place in the story. `generation.json` records the
latest call (mode, seed, steps, weights, resolved config, timings per step and in total, which shots were drawn
and which kept, each shot's take) and, under `history`, the records of the calls before it in the same folder
(re-rolls). A re-rolled shot's earlier take is kept as `takes/shot_NN_take_K.png` (outside the folder's shots,
so readers of the layout do not see it); `shot_NN.png` is always the latest take. A whole story drawn into a
folder replaces the storyboard it held: its record is removed first and written last, and its shots numbered
past the new story's and its takes are removed. A re-roll keeps shots of the story the folder was drawn from only
(`check_same_story`). Before it moves or writes a shot file, a re-roll marks the folder's record with the shots it
re-rolls (`rerolling`: `mark_rerolling`), and its own record, written last, drops the mark: a re-roll killed in
between leaves shot files that are not the takes the record lists (moved to `takes/`, or an unrecorded new take),
and the mark says so, to `storyboard_shots` (which refuses the folder) and to the next re-roll (which must re-roll
those shots too, and takes their recorded takes from `takes/` as the kept shots' context: `recorded_take`). Every
file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamshot.inference.contact_sheet import contact_sheet
from dreamshot.inference.story import Story, load_shot, previous_shot_images, reference_images
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import atomic_path, atomic_write_text
from dreamshot.utils.text import read_text

SHEET_FILE = "sheet/storyboard.png"
RECORD_FILE = "generation.json"
TAKES_DIR = "takes"
# The shots a re-roll that has not written its record yet is drawing again (`mark_rerolling`).
REROLLING_KEY = "rerolling"


def shot_file(index: int) -> str:
    """File name of shot `index` (1-based)."""
    return f"shot_{index:02d}.png"


def shot_index(path: str | Path) -> int | None:
    """The shot index of a file name as ViStoryBench reads it: the text after the last `_`, up to its first
    `.`, as a Python int (`shot_01.png` and `01.jpg` are shot 1, `shot_3.v2.png` shot 3); None when that is
    not a number (`storyboard.png`, `shot-03.png`, `shot_03_v2.png`: not shots)."""
    try:
        return int(Path(path).name.split("_")[-1].split(".")[0])
    except ValueError:
        return None


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB image (rounded to 8 bits)."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def storyboard_bytes(size: tuple[int, int], shots: int, sheet_images: int) -> int:
    """About the most a drawn storyboard takes on disk, to check a folder's free space before drawing: its
    `shots` shot files and a contact sheet of `sheet_images` images, all of `size` (H, W), as uncompressed RGB
    (PNG is smaller), and 1 MiB for its record and captions."""
    return 3 * size[0] * size[1] * (shots + sheet_images) + 2**20


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_shots(out_dir: Path, indices: list[int], images: torch.Tensor) -> None:
    """Write `images` (len(indices), 3, H, W) in [0, 1] as the shot files of `indices`."""
    for index, pixels in zip(indices, images, strict=True):
        save_png(to_image(pixels), out_dir / shot_file(index))


def load_kept_shots(
    out_dir: Path, indices: list[int], size: tuple[int, int], record: dict | None = None
) -> torch.Tensor:
    """The shot files of `indices` as (len(indices), 3, H, W) in [-1, 1]; each must be `size` (H, W) already.
    With `record`, the takes it lists (`recorded_take`)."""
    shots = []
    for index in indices:
        path = out_dir / shot_file(index) if record is None else recorded_take(out_dir, record, index)
        if not path.is_file():
            raise DataError(f"{path}: kept shot {index} not found (--regenerate needs the folder of an earlier run)")
        with Image.open(path) as image:
            found = image.size
        if found != (size[1], size[0]):
            raise DataError(f"{path}: kept shot is {found[0]}x{found[1]}, the story draws {size[1]}x{size[0]} (W x H)")
        shots.append(load_shot(path, size, str(path)))
    return torch.stack(shots) if shots else torch.zeros(0, 3, *size)


def take_file(index: int, take: int) -> str:
    """File name (under `TAKES_DIR`) of an earlier take of shot `index`."""
    return f"shot_{index:02d}_take_{take}.png"


def shot_takes(record: dict | None, count: int) -> dict[int, int]:
    """Shot index -> its take in the folder of `record` (1 for every shot when there is no earlier record)."""
    takes = {n: 1 for n in range(1, count + 1)}
    for shot in (record or {}).get("shots", []):
        if isinstance(shot, dict) and shot.get("index") in takes:
            takes[shot["index"]] = int(shot.get("take", 1))
    return takes


def recorded_take(out_dir: Path, record: dict, index: int) -> Path:
    """The file of the take of shot `index` that the folder's `record` lists: its shot file, unless a re-roll killed
    before its record (`mark_rerolling`) had moved that take to takes/ already (the shot file is then that re-roll's
    unrecorded take, or missing). A re-roll run again after a kill so encodes the kept shots as the killed one did."""
    if index in record.get(REROLLING_KEY, []):
        moved = out_dir / TAKES_DIR / take_file(index, shot_takes(record, len(record["shots"]))[index])
        if moved.is_file():
            return moved
    return out_dir / shot_file(index)


def keep_earlier_takes(out_dir: Path, indices: list[int], takes: dict[int, int]) -> dict[int, int]:
    """Before shots `indices` are drawn again: move each one's file to `takes/`, as its recorded take or, when
    a file holds that take already, the next free one; returns the takes after the re-roll (each of those shots
    one past the take it was kept as). A take file is never overwritten: a re-roll killed before its record was
    written leaves its shot over a take the record does not count yet, and the rerun keeps it as a take too."""
    after = dict(takes)
    for index in indices:
        take, path = takes[index], out_dir / shot_file(index)
        if path.is_file():
            (out_dir / TAKES_DIR).mkdir(exist_ok=True)
            while (out_dir / TAKES_DIR / take_file(index, take)).exists():
                take += 1
            path.replace(out_dir / TAKES_DIR / take_file(index, take))
        after[index] = take + 1
    return after


def remove_earlier_storyboard(out_dir: Path, count: int) -> None:
    """Before a whole storyboard of `count` shots is drawn into `out_dir`: remove the shot files numbered past
    `count` and every take of the storyboard the folder held, which readers of the folder would otherwise take for
    this one's (ViStoryBench reads every numbered image; a later re-roll would count the old takes). Its record
    goes first: a draw killed after it leaves a folder without `generation.json` (not a storyboard to its readers,
    drawn again whole by the next call), never one whose record describes shots removed or overwritten since."""
    (out_dir / RECORD_FILE).unlink(missing_ok=True)
    shots = [path for path in out_dir.glob("shot_*.png") if path.name == shot_file(shot_index(path) or 0)]
    for path in [
        *(path for path in shots if shot_index(path) > count),
        *(out_dir / TAKES_DIR).glob("shot_*_take_*.png"),
    ]:
        path.unlink()


def write_contact_sheet(
    out_dir: Path, story: Story, size: tuple[int, int], title: str = "", takes: dict[int, int] | None = None
) -> Path:
    """`sheet/storyboard.png` from the folder's shot files and the story's references and annotations: the story's
    previous shots first (tagged "given"), then its shots, numbered after them; a shot past its first take is
    tagged with its take."""
    given = [to_image((image + 1) / 2) for image in previous_shot_images(story, size)]
    shots = []
    for index in range(1, len(story.shots) + 1):
        with Image.open(out_dir / shot_file(index)) as image:
            shots.append(image.convert("RGB"))
    takes = takes or {}
    tags = ["given"] * len(given) + [
        f"take {takes[n]}" if takes.get(n, 1) > 1 else "" for n in range(1, len(story.shots) + 1)
    ]
    references = [to_image((ref + 1) / 2) for ref in reference_images(story, size)]
    sheet = contact_sheet(
        given + shots,
        [shot.annotation for shot in [*story.previous_shots, *story.shots]],
        references,
        [ref.prompt for ref in story.references],
        title=title,
        tags=tags,
    )
    path = out_dir / SHEET_FILE
    save_png(sheet, path)
    return path


def read_record(out_dir: Path) -> dict:
    """The folder's `generation.json`."""
    path = out_dir / RECORD_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (expected the output folder of a finished `dreamshot generate`)")
    try:
        record = json.loads(read_text(path, "generation record"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not (isinstance(record, dict) and isinstance(record.get("seed"), int) and isinstance(record.get("shots"), list)):
        raise DataError(f"{path}: not a generation record (needs 'seed' and 'shots')")
    return record


def check_same_story(out_dir: Path, record: dict, story: Story, kept: list[int], conditions_sha256: str) -> None:
    """DataError naming `generation.json` unless `record` was drawn from `story`: the same number of shots, each kept
    shot's annotation, and the references and given shots — their digest `conditions_sha256` as `record` holds it
    (`conditions_sha256`; a record written before it: the references' roles and prompts). The annotation of a shot
    re-rolled may change: that is how a shot's prompt is fixed."""
    path, shots = out_dir / RECORD_FILE, record["shots"]
    if len(shots) != len(story.shots):
        raise DataError(
            f"{path}: drawn from a story of {len(shots)} shots ({record.get('story', '?')}), {story.path} has "
            f"{len(story.shots)}: --regenerate re-rolls shots of the story the folder holds"
        )
    for n in kept:
        drawn_for, now = shots[n - 1].get("annotation"), story.shots[n - 1].annotation
        if drawn_for != now:
            raise DataError(f"{path}: kept shot {n} was drawn for {drawn_for!r}, {story.path} says {now!r}")
    if "conditions_sha256" in record:
        if record["conditions_sha256"] != conditions_sha256:
            raise DataError(
                f"{path}: drawn with other references or given shots (texts or images) than {story.path} has"
            )
        return
    recorded = [[ref.get("role"), ref.get("prompt")] for ref in record.get("references", [])]
    if recorded != [[ref.role, ref.prompt] for ref in story.references]:
        raise DataError(f"{path}: drawn with references {recorded} (role, prompt), {story.path} has other ones")


def mark_rerolling(out_dir: Path, record: dict, shots: list[int]) -> None:
    """Before a re-roll moves or writes the files of `shots`: the folder's record `record`, marked with them."""
    atomic_write_text(out_dir / RECORD_FILE, json.dumps({**record, REROLLING_KEY: shots}, indent=2))


def check_rerolls(out_dir: Path, record: dict, shots: list[int]) -> None:
    """DataError unless a re-roll of `shots` re-rolls every shot a re-roll killed before its record left unfinished
    (its files are not the takes `record` lists, so they cannot be kept as they are)."""
    unfinished = [n for n in record.get(REROLLING_KEY, []) if n not in shots]
    if unfinished:
        raise DataError(
            f"{out_dir / RECORD_FILE}: a re-roll of shots {_listed(record[REROLLING_KEY])} stopped before its record "
            f"was written: re-roll {_listed(unfinished)} too (--regenerate {_listed(sorted({*shots, *unfinished}))})"
        )


def _listed(shots: list[int]) -> str:
    return ",".join(map(str, shots))


def storyboard_shots(out_dir: Path) -> list[tuple[Path, str]]:
    """(image file, annotation) of every shot of the storyboard in `out_dir`, in order; DataError for a folder a
    re-roll was killed in (`REROLLING_KEY`), whose shot files are not all the takes its record lists."""
    record, path = read_record(out_dir), out_dir / RECORD_FILE
    if record.get(REROLLING_KEY):
        shots = _listed(record[REROLLING_KEY])
        raise DataError(
            f"{path}: a re-roll of shots {shots} stopped before its record was written, so those shot files are not "
            f"the takes it lists: run it again (dreamshot generate ... --regenerate {shots})"
        )
    shots = []
    for i, shot in enumerate(record["shots"]):
        if not (isinstance(shot, dict) and all(isinstance(shot.get(key), str) for key in ("file", "annotation"))):
            raise DataError(f"{path}: shots[{i}]: expected a mapping with 'file' and 'annotation' strings")
        image = out_dir / shot["file"]
        if not image.is_file():
            raise DataError(f"{path}: shots[{i}].file: {image} not found")
        shots.append((image, shot["annotation"]))
    if not shots:
        raise DataError(f"{path}: shots: the storyboard has no shots")
    return shots


def write_record(out_dir: Path, record: dict, previous: dict | None = None) -> Path:
    """Write `record` as `generation.json`, keeping `previous` (and its history) under `history`."""
    history = []
    if previous is not None:
        history = [
            *previous.get("history", []),
            {k: v for k, v in previous.items() if k not in ("history", REROLLING_KEY)},
        ]
    path = out_dir / RECORD_FILE
    atomic_write_text(path, json.dumps({**record, "history": history}, indent=2))
    return path
