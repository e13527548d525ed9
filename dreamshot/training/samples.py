"""A storyboard drawn during training (`trainer.sample`): every n optimizer steps, the model being trained draws
one storyboard — a story file, or the run's first validation storyboard from its references and annotations —
into `<output_dir>/samples/stepNNNNNN.png` (a contact sheet, the validation storyboard's true shots under the drawn
ones) and logs it to W&B as `samples/storyboard`.

Under context parallelism the storyboard is drawn by rank 0's whole context-parallel group, through the same
split forward as training (a storyboard long enough to need CP may not fit on one GPU); the other data-parallel
groups train on. Every rank of the group decides alike (the same optimizer step, the same seed), so the group
draws what one process would; rank 0 alone builds the contact sheet, writes the PNG and logs it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from dreamshot.config.schema import Config
from dreamshot.data.dataset import StoryboardDataset, load_images
from dreamshot.inference.contact_sheet import contact_sheet
from dreamshot.inference.outputs import save_png, to_image
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.inference.story import Story, load_story, story_request

SAMPLES_DIR = "samples"


class SampleStoryboard(L.Callback):
    def __init__(self, cfg: Config, output_dir: Path) -> None:
        self.cfg = cfg
        self.folder = Path(output_dir) / SAMPLES_DIR
        # A story file is read (and checked) now, before training starts.
        self.story: Story | None = load_story(cfg.trainer.sample.story) if cfg.trainer.sample.story else None
        self.last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run's checkpoint step was drawn before it was saved; under gradient accumulation the first
        # batches after the resume still belong to that step.
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        degree = pl_module.adapter.context_parallel.degree
        if not draws_at(step, self.last_step, self.cfg.trainer.sample.every_n_steps, trainer.global_rank, degree):
            return
        self.last_step = step
        sheet = self.draw(pl_module, trainer.datamodule.val_set, step, sheet=trainer.global_rank == 0)
        if sheet is None:
            return
        save_png(sheet, self.folder / f"step{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/storyboard", [sheet], step=step)

    def draw(
        self, pl_module: L.LightningModule, val_set: StoryboardDataset, step: int, sheet: bool = True
    ) -> Image.Image | None:
        """The storyboard drawn with the module's current weights, as a contact sheet (without `sheet`: drawn
        only, for the other ranks of a context-parallel group, whose forwards are the group's collectives)."""
        request, truth = self._request(val_set, with_truth=sheet)
        adapter = pl_module.adapter
        was_training = adapter.training
        adapter.eval()
        try:
            seed, steps = self.cfg.inference.seed, self.cfg.trainer.sample.steps
            result = StoryboardPipeline(adapter, self.cfg)(request, seed=seed, steps=steps, progress=False)
        finally:
            adapter.train(was_training)
        if not sheet:
            return None
        references = [] if request.references is None else [to_image((r + 1) / 2) for r in request.references]
        return contact_sheet(
            [to_image(pixels) for pixels in result.images],
            request.shot_texts,
            references,
            request.reference_texts,
            title=f"{self.cfg.name} · step {step} · {result.mode} · seed {seed} · {steps} sampler steps",
            ground_truth=truth,
        )

    def _request(
        self, val_set: StoryboardDataset, with_truth: bool = True
    ) -> tuple[StoryboardRequest, list[Image.Image] | None]:
        """What to draw, and (`with_truth`) the true shots when it is a validation storyboard."""
        if self.story is not None:
            size = self.story.size or (self.cfg.data.resolution[0], self.cfg.data.resolution[1])
            return story_request(self.story, size), None
        record, size, window = val_set.records[0], val_set.resolutions[0], val_set.window(0)
        shots, refs = load_images(record, size, window)  # images even when training reads a latent cache
        request = StoryboardRequest(
            shot_texts=[record.shots[n].annotation for n in window],
            size=size,
            references=refs if len(refs) else None,
            reference_texts=[ref.prompt for ref in record.references],
        )
        return request, [to_image((shot + 1) / 2) for shot in shots] if with_truth else None


def draws_at(step: int, last_step: int, every_n_steps: int, global_rank: int, degree: int) -> bool:
    """Whether this rank draws the sample (or `eval.callback`'s stories) after a batch of optimizer step `step`
    (`last_step`: the step it last drew at). Every `every_n_steps` steps, once per step (under gradient
    accumulation global_step stays put for several batches), on the ranks of rank 0's context-parallel group:
    ranks 0..degree-1, data-parallel rank 0 as the strategy counts it (`distributed_sampler_kwargs`)."""
    due = step > 0 and step % every_n_steps == 0 and step != last_step
    return due and global_rank // degree == 0
