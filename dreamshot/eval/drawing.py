"""Drawing a set of stories across ranks, resumably: the shared loop of `dreamshot eval` and `dreamshot
generate FOLDER`.

1. Rank 0 reads every story's record (`resume.story_complete`) and decides which stories are left to draw: those
   without a record, with another fingerprint or story digest, or with a file that changed. Every rank gets
   that list, so every rank computes the same assignment (`sharding.share_of`, balanced by FLOPs).
2. Each rank draws its share, most costly first: the story's old record and shots are removed, its shots
   drawn and written (atomically, one file at a time), and its record written last. The model is loaded only
   by a rank with something to draw.
3. A story that runs out of GPU memory is logged with its id and token count and skipped; once every rank is
   done, a run with such stories stops with one line naming them (what was drawn stays, and a rerun draws
   only what is missing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamshot.eval.progress import Progress
from dreamshot.eval.resume import clear_story, story_complete, write_story_record
from dreamshot.eval.sharding import Ranks, assign, balance, rank_groups, share_of
from dreamshot.planner.report import flop_unit
from dreamshot.planner.sampling import DEFAULT_MFU, PEAK_TFLOPS, DrawingCost, gpu_hours
from dreamshot.utils.errors import ResourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrawJob:
    """One story to draw into `folder`: `shots` drawn shots, the planner's `cost`, the digest of its inputs."""

    id: str
    folder: Path
    shots: int
    cost: DrawingCost
    digest: str


# draw(pipeline, job) writes the story's shots (and anything else) into job.folder and returns its record and
# the files of the record's `resume.files` (the drawn shots).
Draw = Callable[[Any, DrawJob], tuple[dict, list[str]]]


def draw_stories(
    jobs: list[DrawJob], fingerprint: dict, ranks: Ranks, out: Path, load: Callable[[], Any], draw: Draw
) -> int:
    """Draw the jobs not yet complete on disk, this rank's share of them; returns how many were drawn in all."""
    todo_ids, token = ranks.decide(lambda: _left_to_draw(jobs, fingerprint))
    left = set(todo_ids)
    todo = {job.id: job for job in jobs if job.id in left}
    costs = {job.id: float(job.cost.flops) for job in todo.values()}
    shares = assign(costs, len(rank_groups(ranks.world)))
    planned = max((sum(costs[s] for s in share) for share in shares), default=0.0)
    if ranks.is_main:
        print(_plan_line(len(jobs), list(todo.values()), ranks.world, balance(costs, shares) if costs else 1.0))
    failed = []
    totals = sum(job.shots for job in todo.values()), sum(costs.values())
    with Progress(out, ranks, token, len(todo), *totals, gpu_hours(planned) * 3600) as progress:
        pipeline = None
        for story in share_of(ranks, costs):
            job = todo[story]
            pipeline = pipeline or load()
            failure = _draw_one(pipeline, job, fingerprint, draw, progress, ranks)
            if failure is not None:
                failed.append(failure)
    failures = [failure for part in ranks.all_gather(failed) for failure in part]
    if failures:
        raise ResourceError(_out_of_memory(failures, len(todo)))
    return len(todo)


def _left_to_draw(jobs: list[DrawJob], fingerprint: dict) -> tuple[list[str], str]:
    status = {job.id: story_complete(job.folder, fingerprint, job.digest) for job in jobs}
    redrawn = [story for story, complete in status.items() if complete is False]
    if redrawn:
        log.warning("%d stories were drawn with another config or input and are drawn again", len(redrawn))
    # The token tells this run's progress files from those a killed run left.
    return [story for story, complete in status.items() if not complete], str(time.time_ns())


def _draw_one(
    pipeline: Any, job: DrawJob, fingerprint: dict, draw: Draw, progress: Progress, ranks: Ranks
) -> dict | None:
    clear_story(job.folder)
    start = time.perf_counter()
    try:
        record, files = draw(pipeline, job)
    except torch.OutOfMemoryError:
        log.error("story %s: out of memory (%d video tokens per sample)", job.id, job.cost.tokens)
        failure = {"story": job.id, "tokens": job.cost.tokens, "shots": job.shots, "rank": ranks.rank}
    else:
        write_story_record(job.folder, record, fingerprint, job.digest, files)
        progress.story_done(job.id, job.shots, float(job.cost.flops), time.perf_counter() - start, job.cost.tokens)
        return None
    # Outside the handler: the traceback's references to the failed forward's tensors are gone.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return failure


def _plan_line(stories: int, todo: list[DrawJob], world: int, spread: float) -> str:
    if not todo:
        return f"all {stories} stories are drawn already (each story's generation.json records it)"
    flops = sum(job.cost.flops for job in todo)
    shots = sum(job.shots for job in todo)
    unit, scale = flop_unit(flops)
    return (
        f"drawing {len(todo)} of {stories} stories ({stories - len(todo)} already drawn): {shots} shots, "
        f"{flops / scale:.3g} {unit}, {gpu_hours(flops):.2f} GPU-h at {DEFAULT_MFU:.0%} MFU of {PEAK_TFLOPS:g} TFLOPS; "
        f"{world} rank(s), the most loaded at {spread:.3f}x the mean"
    )


def _out_of_memory(failures: list[dict], drawn: int) -> str:
    first = max(failures, key=lambda f: f["tokens"])
    others = f" and {len(failures) - 1} other(s): {', '.join(f['story'] for f in failures if f is not first)}"
    return (
        f"story {first['story']}: out of GPU memory on rank {first['rank']} ({first['shots']} shots, "
        f"{first['tokens']} video tokens per sample){others if len(failures) > 1 else ''}; the other "
        f"{drawn - len(failures)} stories are drawn and a rerun draws only these (on a GPU with more memory, "
        "or at a smaller size)"
    )
