"""`dreamshot generate STORY [key=value ...] (--run DIR | --lora FILE | --base) --out DIR [--regenerate 3,5]`.

Draws a story's shots into DIR (`shot_01.png` …, `sheet/storyboard.png`, `generation.json`). Config overrides
may stand anywhere on the line. `--regenerate` re-rolls only the listed shots of an earlier run in DIR: every
other shot is read back from its PNG (which is not rewritten) and given to the model as a clean condition after
the references, encoded in the storyboard's shot stream with the re-rolled shots' earlier takes at their places
(as training encodes it); those takes then move to `DIR/takes/` (`outputs.py`). Every kept
shot keeps its story position. A re-roll with a story other than the one DIR was drawn from (another shot count, a
kept shot's annotation, other references or given shots: `generation.json` records their digest,
`conditions_sha256`) is refused with one line naming the folder's `generation.json`; the re-rolled shots'
annotations may change. A run whose mode mix never trained the condition set a call needs (a re-roll of an
r2s storyboard needs references and given shots together: `storyboard.modes.r2s_s2s`) is refused with one line
naming the key, before a model is built. STORY may be a folder of story files: each is drawn into
`DIR/<file stem>/`, resumably and, under torchrun, shared by the processes (`dreamshot.eval.story_folder`;
`--redraw` as for `dreamshot eval`).

Precedence (also in `--help`): the noise seed is `--seed`, else (re-roll) the previous run's seed + 1, else the
story's `seed`, else `inference.seed`; the steps are `--steps`, else the story's `steps`, else
`inference.steps`; the shot size is the story's height/width, else `data.resolution`. `--preset exact|fast` sets
the sampler to a measured setting (`dreamshot/inference/presets.py`) before the command line's overrides apply;
`generation.json` records it (`preset`: its name and the overrides of it that applied: with `inference.cache` on the
command line, not its cache options; the resolved values under `config.inference`).

With `inference.context_parallel.degree=N`, N processes started by torchrun draw the storyboard together, each
holding 1/N of its tokens (`torchrun --nproc-per-node N -m dreamshot.cli generate STORY
inference.context_parallel.degree=N ...`); the first one writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

from dreamshot.commands import add_override_arguments
from dreamshot.config.schema import Config
from dreamshot.config.values import SEED_LIMIT
from dreamshot.diffusion.conditioning import check_trained
from dreamshot.eval.resume import story_digest
from dreamshot.eval.sharding import Ranks
from dreamshot.eval.story_folder import generate_folder, steps_source
from dreamshot.inference.loading import (
    add_weight_arguments,
    check_sampling,
    check_steps,
    load_model,
    read_lora,
    weights_and_config,
)
from dreamshot.inference.outputs import (
    check_rerolls,
    check_same_story,
    keep_earlier_takes,
    load_kept_shots,
    mark_rerolling,
    read_record,
    recorded_take,
    remove_earlier_storyboard,
    save_shots,
    shot_file,
    shot_takes,
    storyboard_bytes,
    write_contact_sheet,
    write_record,
)
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardResult
from dreamshot.inference.presets import PRESETS, preset_overrides
from dreamshot.inference.story import Story, load_story, story_request, unreferenced_roles
from dreamshot.models.wan.context_parallel import launched_group
from dreamshot.utils.arguments import positive_int, seed_value
from dreamshot.utils.devices import pick_device
from dreamshot.utils.errors import ConfigError, DataError
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "story", type=Path, help="story file (yaml/json): references, shots, previous_shots; or a folder of them"
    )
    add_override_arguments(parser)
    add_weight_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--regenerate", type=shot_list, help="re-roll only these shots (1-based), e.g. 3,5; earlier takes go to takes/"
    )
    parser.add_argument(
        "--seed",
        type=seed_value,
        help="noise seed (default: with --regenerate the previous seed + 1, else the story's, else inference.seed)",
    )
    parser.add_argument(
        "--steps", type=positive_int, help="sampler steps (default: the story's steps, else inference.steps)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--preset",
        help=f"a measured sampler setting ({' | '.join(PRESETS)}), before the command line's overrides",
    )
    parser.add_argument(
        "--redraw", action="store_true", help="STORY a folder: draw again what --out holds from another config"
    )


def shot_list(text: str) -> list[int]:
    """'3,5' -> [3, 5]: distinct 1-based shot indices."""
    try:
        indices = sorted({int(item) for item in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shot numbers, got {text!r}") from None
    if indices[0] < 1:
        raise argparse.ArgumentTypeError(f"shot numbers start at 1, got {text!r}")
    return indices


def run(args: argparse.Namespace) -> None:
    if args.story.is_dir():
        _run_folder(args)
        return
    story = load_story(args.story)
    for warning in unreferenced_roles(story):
        print(f"dreamshot generate: warning: {warning}", file=sys.stderr)
    weights, cfg = weights_and_config(args, _overrides(args))
    size = story.size or (cfg.data.resolution[0], cfg.data.resolution[1])
    targets = _targets(story, args.regenerate)
    previous = read_record(args.out) if args.regenerate else None
    kept = [n for n in range(1, len(story.shots) + 1) if n not in targets]
    if previous is not None:
        check_same_story(args.out, previous, story, kept, conditions_sha256(story))
        check_rerolls(args.out, previous, targets)
    takes = _earlier_takes(args.out, previous, targets, size) if previous is not None else None
    request = story_request(story, size, targets, load_kept_shots(args.out, kept, size), takes)
    check_trained(cfg.storyboard, request.mode)
    steps = args.steps if args.steps is not None else story.steps
    check_steps(cfg.inference, steps or cfg.inference.steps, steps_source(args.steps, story))
    second = check_sampling(cfg, steps)
    device = _device(args.device, cfg.inference.context_parallel.degree)
    # Checked before the model is built.
    need = storyboard_bytes(size, len(story.shots), len(story.shots) + len(story.references))
    check_output_dir(args.out, "--out", need, "the storyboard's images")

    with launched_group(cfg.inference.context_parallel, device, "inference.context_parallel") as group:
        cfg, adapter = load_model(cfg, weights, device, second=second)
        adapter.context_parallel = group
        seed = _seed(args.seed, previous, story, cfg)
        writer = group.rank == 0
        result = StoryboardPipeline(adapter, cfg)(request, seed=seed, steps=steps, progress=writer)
    if not writer:
        return

    drawn = Drawn(story, cfg, result, weights, targets, kept, size, _preset_record(args))
    record, sheet = _write_storyboard(args.out, drawn, previous)
    write_record(args.out, record, previous)
    shots = ", ".join(map(str, targets))
    print(
        f"{result.mode}: drew shots {shots} of {len(story.shots)} in {result.total_seconds:.1f} s"
        f" (seed {result.seed}, {len(result.step_seconds)} steps) -> {args.out}"
        f" ({sheet.relative_to(args.out).as_posix()})"
    )


def _device(name: str | None, processes: int) -> torch.device:
    """--device, else cuda when available (under torchrun, each process its LOCAL_RANK's GPU), else cpu."""
    device = pick_device(name, "--device")
    if device.type == "cuda" and device.index is None and processes > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _run_folder(args: argparse.Namespace) -> None:
    if args.regenerate:
        raise DataError(f"{args.story}: --regenerate re-rolls shots of one story file, not of a folder")
    weights, cfg = weights_and_config(args, _overrides(args))
    if cfg.inference.context_parallel.degree > 1:
        raise ConfigError(
            f"inference.context_parallel.degree={cfg.inference.context_parallel.degree} draws one story file on "
            f"its processes; a folder of stories is shared out over them instead (degree 1)"
        )
    device = pick_device(args.device, "--device")
    ranks = Ranks.from_environment(device.type)
    device = ranks.device(device)
    # Read (and checked) before anything is written; the model is built by a rank with a story to draw.
    lora = read_lora(weights) if weights is not None else None
    second = check_sampling(cfg, args.steps)

    def load_pipeline() -> StoryboardPipeline:
        model_cfg, adapter = load_model(cfg, weights, device, lora, second)
        return StoryboardPipeline(adapter, model_cfg)

    def draw_into(pipeline: StoryboardPipeline, story: Story, out: Path, seed: int, steps: int, size) -> dict:
        result = pipeline(story_request(story, size), seed=seed, steps=steps, progress=False)
        targets = list(range(1, len(story.shots) + 1))
        drawn = Drawn(story, pipeline.config, result, weights, targets, [], size, _preset_record(args))
        return _write_storyboard(out, drawn, None)[0]

    try:
        generate_folder(
            args.story, cfg, args.out, weights, load_pipeline, draw_into, args.seed, args.steps, ranks, args.redraw
        )
    finally:
        ranks.close()


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command line's config overrides, after those of `--preset`."""
    return [*(preset_overrides(args.preset, args.overrides) if args.preset else []), *args.overrides]


def _preset_record(args: argparse.Namespace) -> dict | None:
    """What `generation.json` records of `--preset`: its name and the overrides of it that applied."""
    return {"name": args.preset, "overrides": preset_overrides(args.preset, args.overrides)} if args.preset else None


class Drawn(NamedTuple):
    """A story drawn: what `generation.json` records. `targets`: the shots drawn; `kept`: those read back;
    `preset`: `_preset_record`."""

    story: Story
    cfg: Config
    result: StoryboardResult
    weights: Path | None
    targets: list[int]
    kept: list[int]
    size: tuple[int, int]
    preset: dict | None


def _write_storyboard(out: Path, drawn: Drawn, previous: dict | None) -> tuple[dict, Path]:
    """The drawn shots (earlier takes of re-rolled ones moved to takes/) and the contact sheet, written into
    `out`; returns the record to write and the sheet's path."""
    out.mkdir(parents=True, exist_ok=True)
    result = drawn.result
    takes = shot_takes(previous, len(drawn.story.shots))
    if previous is not None:
        mark_rerolling(out, previous, drawn.targets)
        takes = keep_earlier_takes(out, drawn.targets, takes)
    else:
        remove_earlier_storyboard(out, len(drawn.story.shots))
    save_shots(out, drawn.targets, result.images)
    weights_label = str(drawn.weights) if drawn.weights else "base model (no LoRA)"
    title = f"{result.mode} · seed {result.seed} · {len(result.step_seconds)} steps · weights {weights_label}"
    sheet = write_contact_sheet(out, drawn.story, drawn.size, title, takes)
    return _record(drawn, takes), sheet


def _earlier_takes(out: Path, record: dict, targets: list[int], size: tuple[int, int]) -> torch.Tensor | None:
    """The takes `record` lists of the shots a re-roll draws again (the kept shots' context in the shot stream;
    `recorded_take`: also after a re-roll killed before its record), or None when one is missing."""
    if not all(recorded_take(out, record, n).is_file() for n in targets):
        return None
    return load_kept_shots(out, targets, size, record)


def _targets(story: Story, regenerate: list[int] | None) -> list[int]:
    count = len(story.shots)
    if regenerate is None:
        return list(range(1, count + 1))
    if regenerate[-1] > count:
        raise DataError(f"{story.path}: shots: --regenerate names shot {regenerate[-1]}, the story has {count}")
    return regenerate


def _seed(explicit: int | None, previous: dict | None, story: Story, cfg: Config) -> int:
    if explicit is not None:
        return explicit
    if previous is not None:
        # A re-roll must draw new noise: the same seed would redraw the same shots.
        return (int(previous["seed"]) + 1) % SEED_LIMIT
    return story.seed if story.seed is not None else cfg.inference.seed


def conditions_sha256(story: Story) -> str:
    """SHA-256 of what every shot of `story` is drawn from besides its own annotation: the references (role, prompt,
    image bytes), the given shots (annotation, image bytes) and the number of shots."""
    inputs = {
        "references": [[r.role, r.prompt] for r in story.references],
        "previous": [s.annotation for s in story.previous_shots],
        "shots": len(story.shots),
    }
    return story_digest(inputs, [r.image for r in story.references] + [s.image for s in story.previous_shots])


def _record(drawn: Drawn, takes: dict[int, int]) -> dict:
    story, result, weights, preset = drawn.story, drawn.result, drawn.weights, drawn.preset
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "story": str(story.path.absolute()),
        "conditions_sha256": conditions_sha256(story),
        "mode": result.mode,
        "seed": result.seed,
        "steps": len(result.step_seconds),
        "size": list(drawn.size),
        "weights": str(weights.absolute()) if weights else "base",
        "drawn_shots": drawn.targets,
        "kept_shots": drawn.kept,
        "shots": [
            {"index": n, "file": shot_file(n), "annotation": shot.annotation, "take": takes[n]}
            for n, shot in enumerate(story.shots, start=1)
        ],
        "references": [{**asdict(ref), "image": str(ref.image)} for ref in story.references],
        "timings": {"steps_s": result.step_seconds, "total_s": result.total_seconds},
        "preset": preset,
        "config": OmegaConf.to_container(OmegaConf.structured(_config_that_ran(drawn)), resolve=True),
    }


def _config_that_ran(drawn: Drawn) -> Config:
    """`drawn.cfg` with the seed and steps the storyboard was drawn with (`--seed`, a re-roll's, a story's take
    precedence over `inference`'s), so that the recorded config draws it again."""
    result = drawn.result
    inference = replace(drawn.cfg.inference, seed=result.seed, steps=len(result.step_seconds))
    return replace(drawn.cfg, inference=inference)
