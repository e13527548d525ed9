"""Storyboard metrics during training (`eval.callback`): every n optimizer steps, draw the first few stories of
`eval.benchmark` with the model being trained, score them with the configured metrics and log `eval/<value>`
plus the storyboard contact sheets as one image (W&B image, and a PNG under `<output_dir>/eval_callback/`).

The callback only generates, calls the metrics and logs; the metrics are built on first use (their weights load
once per run). With no weights configured, the toy benchmark still gives its labelled weight-free proxies.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from dreamshot.config.schema import Config

CALLBACK_DIR = "eval_callback"


class StoryboardMetrics(L.Callback):
    def __init__(self, cfg: Config, output_dir: Path) -> None:
        self.cfg = cfg
        self.folder = Path(output_dir) / CALLBACK_DIR
        self.stories = None
        self.suite = None
        self.last_step = -1

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation global_step stays put for several batches: evaluate once per step.
        if step == 0 or step % self.cfg.eval.callback.every_n_steps or step == self.last_step:
            return
        self.last_step = step
        values, sheet = self.evaluate(pl_module)
        for logger in trainer.loggers:  # W&B and the CSV beside it
            logger.log_metrics({f"eval/{name}": value for name, value in values.items()}, step=step)
            if isinstance(logger, WandbLogger):
                logger.log_image("eval/storyboards", [sheet], step=step)
        self.folder.mkdir(parents=True, exist_ok=True)
        sheet.save(self.folder / f"step{step:06d}.png")

    def evaluate(self, pl_module: L.LightningModule) -> tuple[dict[str, float], Image.Image]:
        """Draw and score the fixed subset with the module's current weights: (values, stacked contact sheets)."""
        from dreamshot.eval.generation import draw_story  # imported here: training imports this module
        from dreamshot.eval.story_metrics import StorySample
        from dreamshot.inference.pipeline import StoryboardPipeline

        self._setup(pl_module.device)
        ev = self.cfg.eval
        adapter = pl_module.adapter
        was_training = adapter.training
        adapter.eval()
        pipeline = StoryboardPipeline(adapter, self.cfg)
        size = (self.cfg.data.resolution[0], self.cfg.data.resolution[1])
        sheets = []
        try:
            with adapter.alone():  # rank 0 draws by itself, also under context parallelism
                for story in self.stories:
                    draw = draw_story(pipeline, story, ev.mode, size, self.cfg.inference.seed, ev.callback.steps)
                    self.suite.update(StorySample(story, draw[0]))
                    sheets.append(draw[1])
            values = self.suite.compute()
        finally:
            self.suite.reset()
            adapter.train(was_training)
        return values, stack_vertically(sheets)

    def _setup(self, device: torch.device) -> None:
        if self.suite is not None:
            return
        from dreamshot.eval.benchmarks import load_benchmark
        from dreamshot.eval.suite import build_suite

        bench = load_benchmark(self.cfg.eval, self.folder)
        self.stories = bench.stories[: self.cfg.eval.callback.stories]
        self.suite = build_suite(self.cfg.eval, bench, self.folder, device)


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
