"""Progress of a sharded drawing: one log file per rank, and on rank 0 one bar over every rank's stories.

Every rank logs each story it draws (and, in `runner`, scores) to `<out>/logs/rank<r>.log` and keeps its counts in
`<out>/logs/rank<r>.progress.json` (stories, shots and FLOPs drawn, under the run's token), which rank 0 reads
about once a second to draw the bar: shots done of all ranks, shots/s, stories done, and the ETA. The ETA
divides the FLOPs left by the FLOPs per second measured so far, so a 30-shot story counts for what it costs;
before the first story ends it is the planner's (`planner.sampling`: the most loaded rank's FLOPs at the
stated MFU of an H100-class GPU). The bar shows on a terminal only (a log file gets the lines, not the bar).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from dreamshot.eval.sharding import Ranks
from dreamshot.utils.io import atomic_write_text

LOGS_DIR = "logs"
POLL_SECONDS = 1.0
log = logging.getLogger("dreamshot")


@contextmanager
def rank_log(out: Path, ranks: Ranks) -> Iterator[None]:
    """While open, this rank's INFO lines of the `dreamshot` loggers go to `<out>/logs/rank<r>.log` (appended): a
    run's progress in a file, where a bar shows only on a terminal."""
    folder = out / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"rank{ranks.rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {ranks.rank} %(levelname)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)


class Progress:
    """Context manager around one rank's drawing of its share of a plan of `stories` stories, `shots` shots
    and `flops` FLOPs; `planned_seconds` is the planner's wall-clock estimate."""

    def __init__(
        self, out: Path, ranks: Ranks, token: str, stories: int, shots: int, flops: float, planned_seconds: float
    ) -> None:
        self.folder = out / LOGS_DIR
        self.ranks, self.token = ranks, token
        self.totals = {"stories": stories, "shots": shots, "flops": flops}
        self.planned_seconds = planned_seconds
        self.done = {"stories": 0, "shots": 0, "flops": 0.0}
        self._log = rank_log(out, ranks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._log.__enter__()
        self._write()
        if self.ranks.is_main:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def story_done(self, story: str, shots: int, flops: float, seconds: float, tokens: int) -> None:
        self.done["stories"] += 1
        self.done["shots"] += shots
        self.done["flops"] += flops
        self._write()
        log.info("story %s: %d shots drawn in %.1f s (%d video tokens per sample)", story, shots, seconds, tokens)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._log.__exit__(*exc)

    def _write(self) -> None:
        body = {"token": self.token, **self.done}
        atomic_write_text(self.folder / f"rank{self.ranks.rank}.progress.json", json.dumps(body))

    def _watch(self) -> None:
        start = time.monotonic()
        bar_format = "{desc} |{bar}| {n_fmt}/{total_fmt} shots, {rate_fmt}{postfix}"  # tqdm puts ", " before a postfix
        with tqdm(total=self.totals["shots"], desc="drawing", unit="shot", bar_format=bar_format, disable=None) as bar:
            while True:
                stopping = self._stop.wait(POLL_SECONDS)
                done = self.overall()
                bar.update(done["shots"] - bar.n)
                elapsed = time.monotonic() - start
                bar.set_postfix_str(
                    f"stories {done['stories']}/{self.totals['stories']}, ETA {_clock(self.eta(done, elapsed))}"
                )
                if stopping:
                    return

    def overall(self) -> dict[str, float]:
        """Stories, shots and FLOPs drawn so far by every rank of this run."""
        done = {"stories": 0, "shots": 0, "flops": 0.0}
        for path in self.folder.glob("rank*.progress.json"):
            try:
                body = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if body.get("token") == self.token:
                for key in done:
                    done[key] += body[key]
        return done

    def eta(self, done: dict[str, float], elapsed: float) -> float:
        """Seconds left: the FLOPs left at the rate measured so far; the planner's estimate before any story."""
        if done["flops"] <= 0:
            return max(self.planned_seconds - elapsed, 0.0)
        return (self.totals["flops"] - done["flops"]) * elapsed / done["flops"]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
