"""`dreamshot generate FOLDER --out DIR`: every story file of a folder (`*.yaml`, `*.yml`, `*.json`), each drawn
into `DIR/<file stem>/` as `dreamshot generate STORY` draws it (shots, contact sheet, `generation.json`).

The stories are drawn as a benchmark's are (`drawing.py`): over the ranks torchrun starts, balanced by cost,
resumable story by story (a story's `generation.json` carries the drawing fingerprint and the digest of the
story file's content, its images, seed, steps and size), and `DIR/run.json` refuses another folder of stories
or, without `--redraw`, another drawing config. Every story file is read and checked before anything is
written: a role an annotation names without a reference is a warning (as for one story file), and the disk
must have room for the storyboards not drawn yet. Seed, steps and size follow `dreamshot generate`'s
precedence (no re-roll here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from dreamshot.config.schema import Config
from dreamshot.diffusion.conditioning import check_trained
from dreamshot.eval.drawing import DrawJob, draw_stories
from dreamshot.eval.progress import LOGS_DIR
from dreamshot.eval.resume import ResultsFolder, drawing_fingerprint, story_digest
from dreamshot.eval.sharding import Ranks
from dreamshot.inference.loading import check_steps
from dreamshot.inference.outputs import shot_file, storyboard_bytes
from dreamshot.inference.pipeline import StoryboardPipeline
from dreamshot.inference.story import Story, load_story, story_request, unreferenced_roles
from dreamshot.planner.sampling import drawing_cost
from dreamshot.planner.shape import model_shape
from dreamshot.planner.workload import tokens_per_frame
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import check_output_dir, folder_bytes

STORY_SUFFIXES = (".yaml", ".yml", ".json")
# draw_into(pipeline, story, folder, seed, steps, size) draws a story into its folder as `dreamshot generate` does
# (shots, contact sheet) and returns its `generation.json` record.
DrawInto = Callable[[StoryboardPipeline, Story, Path, int, int, tuple[int, int]], dict]


def load_story_folder(folder: Path) -> dict[str, Story]:
    """Every story file of `folder` by its stem, all checked (`load_story`); none, or two with one stem, is a
    DataError."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in STORY_SUFFIXES)
    if not paths:
        raise DataError(f"{folder}: no story files ({', '.join(STORY_SUFFIXES)})")
    stories: dict[str, Story] = {}
    for path in paths:
        if path.stem == LOGS_DIR:
            raise DataError(f"{path}: a story may not be named {LOGS_DIR!r} (the folder of the ranks' logs)")
        if path.stem in stories:
            raise DataError(f"{path}: a second story named {path.stem!r} (its output folder would be shared)")
        stories[path.stem] = load_story(path)
    return stories


def generate_folder(
    folder: Path,
    cfg: Config,
    out: Path,
    weights: Path | None,
    load_pipeline: Callable[[], StoryboardPipeline],
    draw_into: DrawInto,
    seed: int | None = None,
    steps: int | None = None,
    ranks: Ranks | None = None,
    redraw: bool = False,
) -> int:
    """Draw the stories of `folder` left to draw into `out`; returns how many were drawn (by all ranks)."""
    ranks = ranks or Ranks()
    stories = load_story_folder(folder)
    if ranks.is_main:
        for story in stories.values():
            for warning in unreferenced_roles(story):
                print(f"dreamshot generate: warning: {warning}", file=sys.stderr)
    default_size = (cfg.data.resolution[0], cfg.data.resolution[1])
    fingerprint = ranks.decide(
        lambda: drawing_fingerprint(cfg, weights, default_size, steps or cfg.inference.steps, "story file")
    )
    results = ResultsFolder(out, {"command": "generate", "stories": str(folder.absolute())}, fingerprint)
    ranks.decide(lambda: results.check(redraw))
    settings = {name: _settings(story, cfg, seed, steps, default_size) for name, story in stories.items()}
    for name, story in stories.items():
        check_trained(cfg.storyboard, story_request(story, settings[name][2]).mode)
        check_steps(cfg.inference, settings[name][1], steps_source(steps, story))
    jobs = _jobs(stories, settings, cfg, out)
    # Before anything is written or a model built; what the folder holds (stories drawn already) is not drawn again.
    need = sum(
        storyboard_bytes(settings[name][2], len(story.shots), len(story.shots) + len(story.references))
        for name, story in stories.items()
    )
    ranks.decide(
        lambda: check_output_dir(out, "--out", need - folder_bytes(out), f"the images of {len(stories)} storyboards")
    )
    ranks.decide(results.write)

    def draw(pipeline: StoryboardPipeline, job: DrawJob) -> tuple[dict, list[str]]:
        story, (story_seed, story_steps, size) = stories[job.id], settings[job.id]
        record = draw_into(pipeline, story, job.folder, story_seed, story_steps, size)
        return record, [shot_file(n) for n in range(1, len(story.shots) + 1)]

    drawn = draw_stories(jobs, fingerprint, ranks, out, load_pipeline, draw)
    if ranks.is_main:
        print(f"{drawn} of {len(stories)} stories drawn into {out} ({len(stories) - drawn} were drawn already)")
    return drawn


def _settings(
    story: Story, cfg: Config, seed: int | None, steps: int | None, size: tuple[int, int]
) -> tuple[int, int, tuple[int, int]]:
    """(seed, steps, size) of a story: the command line's, else the story's, else the config's."""
    story_seed = seed if seed is not None else story.seed if story.seed is not None else cfg.inference.seed
    story_steps = steps or story.steps or cfg.inference.steps
    return story_seed, story_steps, story.size or size


def steps_source(explicit: int | None, story: Story) -> str:
    """What set a story's sampler steps: `--steps`, else the story file's `steps`, else `inference.steps`."""
    if explicit is not None:
        return "--steps"
    return f"{story.path}: steps" if story.steps is not None else "inference.steps"


def _jobs(stories: dict[str, Story], settings: dict, cfg: Config, out: Path) -> list[DrawJob]:
    shape = model_shape(cfg.model, count_encoders=False)
    jobs = []
    for name, story in stories.items():
        seed, steps, size = settings[name]
        conditions = len(story.references) + len(story.previous_shots)
        per_frame = tokens_per_frame(*size, f"{story.path}: height / width")
        cost = drawing_cost(shape, conditions, len(story.shots), per_frame, cfg.model.text_len, steps)
        inputs = {
            "references": [[r.role, r.prompt] for r in story.references],
            "previous": [s.annotation for s in story.previous_shots],
            "shots": [s.annotation for s in story.shots],
            "seed": seed,
            "steps": steps,
            "size": list(size),
        }
        images = [r.image for r in story.references] + [s.image for s in story.previous_shots]
        jobs.append(DrawJob(name, out / name, len(story.shots), cost, story_digest(inputs, images)))
    return jobs
