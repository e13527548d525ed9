"""Shots to score: drawn by the storyboard pipeline for a benchmark story, or read from a folder of outputs.

Both use ViStoryBench's output layout: `<folder>/<story id>/` (or its `shots/` subfolder) holds one image per
shot, whose 1-based shot index is read as ViStoryBench reads it (`outputs.shot_index`: `shot_01.png`,
`01.jpg`). Shot files are the extensions ViStoryBench reads, in any case (.png .jpg .jpeg .gif .bmp; not
.webp); image files without a shot number (`storyboard.png`, `shot-03.png`, `shot_03_v2.png`) and hidden files
(e.g. macOS `._shot_01.png`) are not shots. The contact sheet is written to `sheet/storyboard.png`.

Modes: r2s gives the model every character's first reference image with its prompt; t2s gives only the shot
texts; s2s gives the story's first `previous` ground-truth shots (with their texts) as clean conditions. Only
the shots a mode draws are written and scored.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dreamshot.eval.benchmarks.types import BenchShot, BenchStory
from dreamshot.eval.reading import open_as_published
from dreamshot.inference.contact_sheet import contact_sheet
from dreamshot.inference.outputs import SHEET_FILE, save_png, shot_file, shot_index, to_image
from dreamshot.inference.pipeline import StoryboardPipeline
from dreamshot.inference.story import Story, StoryRole, StoryShot, load_shot, story_request
from dreamshot.utils.errors import DataError

# The shot files ViStoryBench's output reader takes (its IMAGE_EXTS, compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


def story_for_mode(story: BenchStory, mode: str) -> Story:
    """The storyboard-pipeline story (DESIGN §2 modes) that draws `story.scored_shots(mode)`."""
    if mode == "s2s" and story.previous == 0:
        raise DataError(f"story {story.id!r}: previous: s2s needs at least one given shot, the story gives none")
    references = []
    if mode == "r2s":
        references = [StoryRole(c.key, c.images[0], c.prompt) for c in story.characters.values() if c.images]
    previous = [StoryShot(s.prompt, s.image) for s in story.shots[: story.previous]] if mode == "s2s" else []
    shots = [StoryShot(s.prompt) for s in story.scored_shots(mode)]
    return Story(path=Path(story.id), references=references, previous_shots=previous, shots=shots)


def draw_story(
    pipeline: StoryboardPipeline,
    story: BenchStory,
    mode: str,
    size: tuple[int, int],
    seed: int,
    steps: int | None,
    weights: str = "",
    sheet: bool = True,
) -> tuple[dict[int, Image.Image], Image.Image | None]:
    """Draw the shots `mode` asks for at `size` (H, W): ({shot index: image}, the contact sheet; None without
    `sheet`, for a rank that only takes part in a context-parallel group's forwards).

    The sheet is titled with the story, mode, seed and `weights` (a label); in s2s the given shots come first,
    tagged; every shot is numbered by its index in the story, and under the drawn shots stand the benchmark's
    true shots where it has them.
    """
    request = story_request(story_for_mode(story, mode), size)
    result = pipeline(request, seed=seed, steps=steps, progress=False)
    scored = story.scored_shots(mode)
    indices = [shot.index for shot in scored]
    shots = {index: to_image(pixels) for index, pixels in zip(indices, result.images, strict=True)}
    if not sheet:
        return shots, None
    references = [] if request.references is None else [to_image((ref + 1) / 2) for ref in request.references]
    given = [] if request.given_shots is None else [to_image((shot + 1) / 2) for shot in request.given_shots]
    numbers = [shot.index for shot in story.shots[: len(given)]] + indices
    title = " · ".join(part for part in (f"story {story.id}", mode, f"seed {seed}", weights) if part)
    sheet = contact_sheet(
        [*given, *shots.values()],
        [*request.given_texts, *request.shot_texts],
        references,
        request.reference_texts,
        title=title,
        numbers=numbers,
        tags=["given"] * len(given) + [""] * len(shots),
        ground_truth=[None] * len(given) + [_truth(shot, size, story.id) for shot in scored],
    )
    return shots, sheet


def _truth(shot: BenchShot, size: tuple[int, int], story_id: str) -> Image.Image | None:
    """The benchmark's own image of `shot` at `size` (H, W), prepared as a drawn shot is; None without one."""
    if shot.image is None:
        return None
    return to_image((load_shot(shot.image, size, f"story {story_id}: shot {shot.index}") + 1) / 2)


def write_story(folder: Path, shots: dict[int, Image.Image], sheet: Image.Image) -> None:
    """`shot_NN.png` for each shot and the contact sheet `sheet/storyboard.png` into `folder`."""
    for index, image in shots.items():
        save_png(image, folder / shot_file(index))
    save_png(sheet, folder / SHEET_FILE)


def read_story_shots(root: Path, story: BenchStory, mode: str) -> dict[int, Image.Image]:
    """The shots `mode` scores for `story`, read from `root/<story id>/` (or its `shots/` subfolder)."""
    return {
        index: open_as_published(path, f"story {story.id}: shot {index}")
        for index, path in story_shot_files(root, story, mode).items()
    }


def story_shot_files(root: Path, story: BenchStory, mode: str) -> dict[int, Path]:
    """The image file of each shot `mode` scores for `story`, found under `root/<story id>/` (or its `shots/`
    subfolder); a missing folder or shot, or two files for one shot, is a DataError."""
    folder = root / story.id
    if (folder / "shots").is_dir():
        folder = folder / "shots"
    if not folder.is_dir():
        raise DataError(f"{root}: story {story.id}: no output folder {folder}")
    files: dict[int, Path] = {}
    unread: dict[int, str] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        index = shot_index(path)
        if index is None:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            unread.setdefault(index, path.name)
            continue
        if index in files:
            raise DataError(f"{folder}: story {story.id}: shot {index}: two files, {files[index].name} and {path.name}")
        files[index] = path
    for shot in story.scored_shots(mode):
        if shot.index not in files:
            message = f"{folder}: story {story.id}: shot {shot.index}: no image (e.g. shot_{shot.index:02d}.png)"
            if shot.index in unread:
                message += f"; {unread[shot.index]} is not read (shots are {' '.join(IMAGE_SUFFIXES)}, as ViStoryBench)"
            raise DataError(message)
    return {shot.index: files[shot.index] for shot in story.scored_shots(mode)}
