"""One evaluation run: draw (or read) every story's shots, update the metrics, write and print the results.

Output folder:
```
<out>/shots/<story id>/shot_NN.png, sheet/storyboard.png   drawn shots (not when scoring an existing folder)
<out>/toy_benchmark/                                       the toy benchmark's data (toy only)
<out>/judge_cache.jsonl                                    the judge's answers (unless eval.judge.cache is set)
<out>/results.json, <out>/results.csv                      dataset-level and per-story values
```
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dreamshot.config.schema import Config
from dreamshot.eval.benchmarks import load_benchmark
from dreamshot.eval.generation import draw_story, read_story_shots, story_shot_files, write_story
from dreamshot.eval.report import EvalResults, describe, log_tables, write_results
from dreamshot.eval.story_metrics import AlignmentMetric, StorySample
from dreamshot.eval.suite import build_suite
from dreamshot.inference.pipeline import StoryboardPipeline

SHOTS_DIR = "shots"


def evaluate(
    cfg: Config,
    out: Path,
    device: torch.device,
    label: str,
    pipeline: StoryboardPipeline | None = None,
    outputs: Path | None = None,
) -> EvalResults:
    """Score `cfg.eval.benchmark` in `cfg.eval.mode`: shots drawn with `pipeline` into `<out>/shots`, or read
    from `outputs` (ViStoryBench layout). Writes results.json / results.csv, logs W&B tables when the logger is
    W&B, prints the comparison with the published rows, and returns the results."""
    if (pipeline is None) == (outputs is None):
        raise ValueError("give exactly one of pipeline (draw the shots) and outputs (score a folder)")
    ev = cfg.eval
    out.mkdir(parents=True, exist_ok=True)
    bench = load_benchmark(ev, out)
    suite = build_suite(ev, bench, out, device)
    if outputs is not None:
        # A missing story or shot is reported before scoring starts, not after the stories before it.
        for story in bench.stories:
            story_shot_files(outputs, story, ev.mode)
    shots_dir = outputs or out / SHOTS_DIR
    size = (cfg.data.resolution[0], cfg.data.resolution[1])
    story_shots = {story.id: len(story.scored_shots(ev.mode)) for story in bench.stories}
    # Bars only on a terminal (disable=None): in a log file they are noise, and an error stays one line.
    with tqdm(total=sum(story_shots.values()), desc="shots", position=1, leave=False, disable=None) as shot_bar:
        for story in tqdm(bench.stories, desc=f"{bench.name} stories", position=0, disable=None):
            if pipeline is not None:
                write_story(
                    shots_dir / story.id,
                    *draw_story(pipeline, story, ev.mode, size, cfg.inference.seed, ev.steps, label),
                )
            suite.update(StorySample(story, read_story_shots(shots_dir, story, ev.mode)))
            shot_bar.update(story_shots[story.id])
    results = EvalResults(
        bench.name, ev.mode, label, suite.compute(), suite.missing_values(), suite.per_story(), story_shots
    )
    alignment = suite.metrics.get("alignment")
    if isinstance(alignment, AlignmentMetric):
        results.extra["judge"] = {"model": ev.judge.model, **asdict(alignment.judge.stats)}
    write_results(out, results)
    if cfg.logger.backend == "wandb":
        _log_wandb(cfg, out, results)
    print(describe(results))
    return results


def _log_wandb(cfg: Config, out: Path, results: EvalResults) -> None:
    import wandb  # imported here: only W&B runs need it

    run = wandb.init(
        project=cfg.logger.project,
        name=f"{cfg.name}/eval-{results.benchmark}-{results.mode}",
        group=cfg.logger.group,
        tags=[*cfg.tags, "eval", results.benchmark, results.mode],
        dir=str(out),
        # The environment wins so a user's WANDB_MODE=online (or disabled) is respected.
        mode=os.environ.get("WANDB_MODE", cfg.logger.mode),
        job_type="eval",
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )
    try:
        log_tables(run, results)
    finally:
        run.finish()
