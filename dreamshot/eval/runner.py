"""One evaluation run: draw (or read) every story's shots, update the metrics, write and print the results.

Output folder:
```
<out>/run.json                                             what the folder holds the results of (resume.py)
<out>/shots/<story id>/shot_NN.png, sheet/storyboard.png   drawn shots (not when scoring an existing folder)
<out>/shots/<story id>/generation.json                     the story's record: written last, it marks it complete
<out>/toy_benchmark/                                       the toy benchmark's data (toy only)
<out>/features/                                            extracted features per image (feature_cache.py)
<out>/logs/rank<r>.log                                     each rank's log of the stories it drew
<out>/judge_cache.jsonl                                    the judge's answers (unless eval.judge.cache is set)
<out>/results.json, <out>/results.csv                      dataset-level and per-story values (json: and the
                                                           fingerprint of the shots it scored)
```

Under torchrun the stories are spread over the ranks (`sharding.py`): the ones left to draw by drawing cost
(`drawing.py`), then every story by its shot count for scoring; rank 0 merges the per-story values in the
benchmark's order and writes the results, equal to a one-process run's. One process takes the same path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dreamshot.config.schema import Config
from dreamshot.data.toyworld import toyworld_bytes
from dreamshot.eval.benchmarks import Benchmark, BenchStory, load_benchmark
from dreamshot.eval.cost import story_costs
from dreamshot.eval.drawing import DrawJob, draw_stories
from dreamshot.eval.feature_cache import FEATURES_DIR, FeatureCache
from dreamshot.eval.generation import draw_story, read_story_shots, story_for_mode, story_shot_files, write_story
from dreamshot.eval.progress import rank_log
from dreamshot.eval.reading import open_as_published
from dreamshot.eval.report import EvalResults, describe, log_tables, write_results
from dreamshot.eval.resume import FINGERPRINT_KEY, ResultsFolder, drawing_fingerprint, eval_identity, story_digest
from dreamshot.eval.sharding import Ranks, share_of
from dreamshot.eval.story_metrics import AlignmentMetric, StorySample
from dreamshot.eval.suite import MetricSuite, build_suite
from dreamshot.inference.outputs import shot_file, storyboard_bytes
from dreamshot.inference.pipeline import StoryboardPipeline
from dreamshot.planner.shape import model_shape
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import check_output_dir, folder_bytes

SHOTS_DIR = "shots"
log = logging.getLogger(__name__)


def evaluate(
    cfg: Config,
    out: Path,
    device: torch.device,
    label: str,
    load_pipeline: Callable[[], StoryboardPipeline] | None = None,
    outputs: Path | None = None,
    weights: Path | None = None,
    ranks: Ranks | None = None,
    redraw: bool = False,
) -> EvalResults:
    """Score `cfg.eval.benchmark` in `cfg.eval.mode`: shots drawn into `<out>/shots` with the pipeline
    `load_pipeline` builds (called only when a story is left to draw; `weights` is its LoRA file, None for
    none), or read from `outputs` (ViStoryBench layout). Writes results.json / results.csv (rank 0), logs W&B
    tables when the logger is W&B, prints the comparison with the published rows, and returns the results.
    `redraw`: a folder drawn with another config is drawn again instead of refused. The free space of `out` is
    checked before any model (the storyboard pipeline, the metrics' extractors) is built."""
    if (load_pipeline is None) == (outputs is None):
        raise ValueError("give exactly one of load_pipeline (draw the shots) and outputs (score a folder)")
    ranks = ranks or Ranks()
    ev = cfg.eval
    size = (cfg.data.resolution[0], cfg.data.resolution[1])
    steps = ev.steps or cfg.inference.steps
    fingerprint = None if outputs else ranks.decide(lambda: drawing_fingerprint(cfg, weights, size, steps, ev.mode))
    folder = ResultsFolder(out, eval_identity(cfg, outputs), fingerprint)
    ranks.decide(lambda: folder.check(redraw))
    # Loaded by rank 0 alone (the toy benchmark is written into `out`), and sent to the others.
    bench = ranks.decide(lambda: _load_benchmark(cfg, out, size, drawing=load_pipeline is not None))
    shots_dir = outputs or out / SHOTS_DIR
    cache = FeatureCache(out / FEATURES_DIR)
    # Built (and so checked) now, but kept on the CPU while the model draws: the GPU's memory is the drawing's.
    suite = build_suite(ev, bench, out, device if load_pipeline is None else torch.device("cpu"), cache)
    if outputs is not None:
        ranks.decide(lambda: check_outputs(outputs, bench, ev.mode))
    jobs = draw_jobs(cfg, bench, shots_dir, size, steps) if load_pipeline is not None else []
    ranks.decide(folder.write)
    if load_pipeline is not None:
        stories = {story.id: story for story in bench.stories}

        def draw(pipeline: StoryboardPipeline, job: DrawJob) -> tuple[dict, list[str]]:
            return _draw(pipeline, stories[job.id], job, cfg, size, label)

        draw_stories(jobs, fingerprint, ranks, out, load_pipeline, draw)
        suite.to(device)
    _score_share(suite, cache, bench, shots_dir, ev.mode, ranks, out)
    results = _merged_results(suite, bench, cfg, label, ranks)
    results.extra[FINGERPRINT_KEY] = fingerprint  # what these values scored: run.json's, unless since replaced
    if ranks.is_main:
        write_results(out, results)
        if cfg.logger.backend == "wandb":
            _log_wandb(cfg, out, results)
        print(describe(results))
    return results


def _load_benchmark(cfg: Config, out: Path, size: tuple[int, int], drawing: bool) -> Benchmark:
    """The benchmark, each part of what the evaluation writes checked against the free space of `out` first:
    the toy benchmark's data (written into `out` as it loads), then the shots, sheets and results
    (`evaluation_bytes`). What `out` holds already (a resumed run) is not written again."""
    ev, held = cfg.eval, folder_bytes(out)
    if ev.benchmark == "toy":
        toy = ev.toy
        need = toyworld_bytes(toy.groups, (toy.image_size[0], toy.image_size[1]), toy.max_shots, toy.max_roles)
        check_output_dir(out, "--out", need - held, "the toy benchmark's images")
    bench = load_benchmark(ev, out)
    what = "the shots, contact sheets and results" if drawing else "the features and results"
    check_output_dir(out, "--out", evaluation_bytes(bench, ev.mode, size, drawing) - held, what)
    return bench


def evaluation_bytes(bench: Benchmark, mode: str, size: tuple[int, int], drawing: bool) -> int:
    """About the most an evaluation writes besides the toy benchmark's data: drawing, every story's shots and
    contact sheet at `size` (H, W), the conditions and the true shots under the drawn ones included
    (`storyboard_bytes`); scoring a folder, 1 MiB of features per story; and 1 MiB of results."""
    if not drawing:
        return 2**20 * (len(bench.stories) + 1)
    total = 2**20
    for story in bench.stories:
        request = story_for_mode(story, mode)
        drawn = len(request.shots)
        total += storyboard_bytes(size, drawn, len(request.references) + len(request.previous_shots) + 2 * drawn)
    return total


def draw_jobs(cfg: Config, bench: Benchmark, shots_dir: Path, size: tuple[int, int], steps: int) -> list[DrawJob]:
    """Every story of the benchmark as a job: its drawing cost and the digest of what it is drawn from."""
    costs = story_costs(model_shape(cfg.model, count_encoders=False), cfg, bench, cfg.eval.mode, size, steps)
    jobs = []
    for story in bench.stories:
        request = story_for_mode(story, cfg.eval.mode)
        inputs = {
            "references": [[r.role, r.prompt] for r in request.references],
            "previous": [s.annotation for s in request.previous_shots],
            "shots": [[shot.index, shot.prompt] for shot in story.scored_shots(cfg.eval.mode)],
        }
        images = [r.image for r in request.references] + [s.image for s in request.previous_shots]
        digest = story_digest(inputs, images)
        jobs.append(DrawJob(story.id, shots_dir / story.id, len(request.shots), costs[story.id], digest))
    return jobs


def _draw(
    pipeline: StoryboardPipeline, story: BenchStory, job: DrawJob, cfg: Config, size: tuple[int, int], label: str
) -> tuple[dict, list[str]]:
    ev = cfg.eval
    shots, sheet = draw_story(pipeline, story, ev.mode, size, cfg.inference.seed, ev.steps, label)
    write_story(job.folder, shots, sheet)
    prompts = {shot.index: shot.prompt for shot in story.shots}
    record = {
        "story": story.id,
        "benchmark": ev.benchmark,
        "mode": ev.mode,
        "seed": cfg.inference.seed,
        "steps": ev.steps or cfg.inference.steps,
        "size": list(size),
        "shots": [{"index": index, "file": shot_file(index), "annotation": prompts[index]} for index in shots],
    }
    return record, [shot_file(index) for index in shots]


def check_outputs(outputs: Path, bench: Benchmark, mode: str) -> None:
    """Every story's shots are in `outputs` (a missing story or shot is reported before scoring starts, not after
    the stories before it), and the shots of a story share one size."""
    for story in bench.stories:
        files = story_shot_files(outputs, story, mode)
        # Decoded, not only opened: a truncated file is reported here too.
        sizes = {path: open_as_published(path, f"story {story.id}: shot {index}").size for index, path in files.items()}
        first = next(iter(files.values()))
        for path, found in sizes.items():
            if found != sizes[first]:
                raise DataError(
                    f"{path}: story {story.id}: shot is {found[0]}x{found[1]}, {first.name} is "
                    f"{sizes[first][0]}x{sizes[first][1]}: the shots of a story must share one size"
                )


def _score_share(
    suite: MetricSuite, cache: FeatureCache, bench: Benchmark, shots_dir: Path, mode: str, ranks: Ranks, out: Path
) -> None:
    """Score this rank's share of the stories (balanced by shot count), each logged to the rank's log; features
    are cached per story."""
    stories = {story.id: story for story in bench.stories}
    mine = share_of(ranks, {story.id: float(len(story.scored_shots(mode))) for story in bench.stories})
    # A bar only on a terminal (disable=None): in a log file it is noise, and an error stays one line.
    bar = tqdm(mine, desc=f"scoring {bench.name}", disable=None if ranks.is_main else True)
    with rank_log(out, ranks):
        for done, story_id in enumerate(bar, start=1):
            story, start = stories[story_id], time.perf_counter()
            sample = StorySample(story, read_story_shots(shots_dir, story, mode))
            suite.update(sample)
            cache.flush(story.id)
            seconds = time.perf_counter() - start
            log.info(
                "story %s: %d shots scored in %.1f s (%d of %d)", story.id, len(sample.shots), seconds, done, len(mine)
            )


def _merged_results(suite: MetricSuite, bench: Benchmark, cfg: Config, label: str, ranks: Ranks) -> EvalResults:
    """Every rank's story values, merged in the benchmark's order into this rank's suite, and the results."""
    alignment = suite.metrics.get("alignment")
    judge = asdict(alignment.judge.stats) if isinstance(alignment, AlignmentMetric) else None
    parts = ranks.all_gather({"metrics": suite.scored(), "judge": judge})
    suite.merge([part["metrics"] for part in parts], [story.id for story in bench.stories])
    ev = cfg.eval
    story_shots = {story.id: len(story.scored_shots(ev.mode)) for story in bench.stories}
    results = EvalResults(
        bench.name, ev.mode, label, suite.compute(), suite.missing_values(), suite.per_story(), story_shots
    )
    if judge is not None:
        stats = {key: sum(part["judge"][key] for part in parts) for key in judge}
        results.extra["judge"] = {"model": ev.judge.model, **stats}
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
