"""Storyboard metrics during training (`eval.callback`): every n optimizer steps, draw the first few stories of
`eval.benchmark` with the model being trained, score them with the configured metrics and log `eval/<value>`
plus the storyboard contact sheets as one image (W&B image, and a PNG under `<output_dir>/eval_callback/`).

The callback only generates, calls the metrics and logs; the metrics are built on first use (their weights load
once per run). With no weights configured, the toy benchmark still gives its labelled weight-free proxies.

Under context parallelism the stories are drawn by rank 0's whole context-parallel group through the training's
split forward, as `trainer.sample` is (`draws_at`: the same steps on every rank, the other data-parallel groups
train on); rank 0 alone builds the metrics and the contact sheets, scores, logs and writes the PNG.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from dreamshot.config.schema import Config
from dreamshot.training.samples import draws_at

CALLBACK_DIR = "eval_callback"


class StoryboardMetrics(L.Callback):
    def __init__(self, cfg: Config, output_dir: Path) -> None:
        self.cfg = cfg
        self.folder = Path(output_dir) / CALLBACK_DIR
        self.stories = None
        self.suite = None
        self.device = torch.device("cpu")
        self.last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # As `SampleStoryboard`'s: a resumed run scored its checkpoint step before it was saved.
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        degree = pl_module.adapter.context_parallel.degree
        if not draws_at(step, self.last_step, self.cfg.eval.callback.every_n_steps, trainer.global_rank, degree):
            return
        self.last_step = step
        self._setup(pl_module, trainer.global_rank)
        draws = self.draw(pl_module, sheets=trainer.global_rank == 0)
        if trainer.global_rank != 0:
            return
        values, sheet = self.score(draws)
        for logger in trainer.loggers:  # W&B and the CSV beside it
            logger.log_metrics({f"eval/{name}": value for name, value in values.items()}, step=step)
            if isinstance(logger, WandbLogger):
                logger.log_image("eval/storyboards", [sheet], step=step)
        self.folder.mkdir(parents=True, exist_ok=True)
        sheet.save(self.folder / f"step{step:06d}.png")

    def draw(
        self, pl_module: L.LightningModule, sheets: bool = True
    ) -> list[tuple[dict[int, Image.Image], Image.Image | None]]:
        """Draw the fixed subset with the module's current weights: per story, its shots and (`sheets`) its contact
        sheet."""
        from dreamshot.eval.generation import draw_story  # imported here: training imports this module
        from dreamshot.inference.pipeline import StoryboardPipeline

        ev = self.cfg.eval
        adapter = pl_module.adapter
        was_training = adapter.training
        adapter.eval()
        pipeline = StoryboardPipeline(adapter, self.cfg)
        size = (self.cfg.data.resolution[0], self.cfg.data.resolution[1])
        try:
            seed, steps = self.cfg.inference.seed, ev.callback.steps
            return [draw_story(pipeline, story, ev.mode, size, seed, steps, sheet=sheets) for story in self.stories]
        finally:
            adapter.train(was_training)

    def score(self, draws: list[tuple[dict[int, Image.Image], Image.Image]]) -> tuple[dict[str, float], Image.Image]:
        """The metric values of the drawn stories and their contact sheets stacked."""
        from dreamshot.eval.story_metrics import StorySample

        # The extractors visit the training's device only to score: between evaluations its memory is training's.
        self.suite.to(self.device)
        try:
            for story, (shots, _) in zip(self.stories, draws, strict=True):
                self.suite.update(StorySample(story, shots))
            values = self.suite.compute()
        finally:
            self.suite.reset()
            self.suite.to(torch.device("cpu"))
        return values, stack_vertically([sheet for _, sheet in draws])

    def _setup(self, pl_module: L.LightningModule, global_rank: int) -> None:
        """The stories, loaded (the toy benchmark written) by rank 0 and shared with its context-parallel group,
        and on rank 0 the metric suite (its weights load there only, on the CPU until `score`)."""
        if self.stories is not None:
            return
        from dreamshot.eval.benchmarks import load_benchmark
        from dreamshot.eval.suite import build_suite

        stories = [None]
        if global_rank == 0:
            bench = load_benchmark(self.cfg.eval, self.folder)
            stories = [bench.stories[: self.cfg.eval.callback.stories]]
            self.device = pl_module.device
            self.suite = build_suite(self.cfg.eval, bench, self.folder, torch.device("cpu"))
        group = pl_module.adapter.context_parallel
        if group.degree > 1:
            dist.broadcast_object_list(stories, group=group.group, group_src=0)
        self.stories = stories[0]


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    """One white image holding `images` top to bottom, left-aligned."""
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), (255, 255, 255))
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


def eval_callbacks(cfg: Config, output_dir: Path) -> list[L.Callback]:
    """The storyboard-metrics callback when `eval.callback.enabled`, else none."""
    return [StoryboardMetrics(cfg, output_dir)] if cfg.eval.callback.enabled else []
