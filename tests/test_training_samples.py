"""Which ranks draw the training sample (`trainer.sample`) and `eval.callback`'s stories, and when (`draws_at`);
which of them build the contact sheets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dreamshot.config.load import load_config
from dreamshot.config.schema import EvalConfig, ToyWorldConfig
from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.eval.callback import StoryboardMetrics
from dreamshot.training import samples
from dreamshot.training.samples import SampleStoryboard, draws_at


@pytest.mark.parametrize(
    ("step", "last_step", "expected"),
    [(0, -1, False), (1, -1, False), (2, -1, True), (2, 2, False), (3, 2, False), (4, 2, True)],
)
def test_a_sample_is_due_every_n_steps_once_per_step(step, last_step, expected):
    """Under gradient accumulation global_step stays put for several batches: the second batch of step 2 skips."""
    assert draws_at(step, last_step, 2, global_rank=0, degree=1) is expected


def test_rank_zeros_context_parallel_group_draws_and_the_other_groups_skip():
    """8 ranks in groups of 4 consecutive ranks (the mesh's layout): ranks 0-3 draw together, 4-7 train on."""
    assert [draws_at(2, -1, 2, rank, degree=4) for rank in range(8)] == [True] * 4 + [False] * 4


def test_without_context_parallelism_rank_zero_draws_alone():
    assert [draws_at(2, -1, 2, rank, degree=1) for rank in range(4)] == [True, False, False, False]


class _Drawer:
    """Stands in for StoryboardPipeline (the forwards of a context-parallel group): grey shots, calls counted."""

    calls = 0

    def __init__(self, adapter, cfg):
        pass

    def __call__(self, request, seed, steps, progress):
        type(self).calls += 1
        count = len(request.shot_texts)
        images = torch.full((count, 3, *request.size), 0.5)
        return SimpleNamespace(images=images, mode="r2s")


def _adapter(degree):
    return SimpleNamespace(
        context_parallel=SimpleNamespace(degree=degree), training=True, eval=lambda: None, train=lambda mode: None
    )


def _trainer(rank, step, val_set=None):
    return SimpleNamespace(global_rank=rank, global_step=step, datamodule=SimpleNamespace(val_set=val_set), loggers=[])


@pytest.fixture(scope="module")
def toy_val_set(tmp_path_factory):
    manifest = generate_toyworld(tmp_path_factory.mktemp("toy"), 1, 3, (32, 48), 2, 2, 1)
    return StoryboardDataset(load_manifest(manifest), (32, 48), 2, train=False)


@pytest.mark.parametrize(("rank", "sheets"), [(0, 1), (1, 0)])
def test_the_other_ranks_of_the_drawing_group_draw_but_build_no_contact_sheet(
    rank, sheets, toy_val_set, tmp_path, monkeypatch
):
    built = []
    monkeypatch.setattr(samples, "StoryboardPipeline", _Drawer)
    monkeypatch.setattr(samples, "contact_sheet", lambda *a, **k: built.append(1) or Image.new("RGB", (8, 8)))
    monkeypatch.setattr(_Drawer, "calls", 0)
    callback = SampleStoryboard(load_config("smoke", ["trainer.sample.every_n_steps=2"]), tmp_path)
    pl_module = SimpleNamespace(adapter=_adapter(degree=2))
    callback.on_train_batch_end(_trainer(rank, 2, toy_val_set), pl_module, None, None, 0)
    assert _Drawer.calls == 1  # the group's forwards are collectives: every member runs them
    assert len(built) == sheets and len(list(tmp_path.rglob("*.png"))) == sheets


def test_an_eval_story_drawn_without_its_sheet_builds_none(monkeypatch, tmp_path):
    from dreamshot.eval import generation
    from dreamshot.eval.benchmarks import load_benchmark

    built = []
    monkeypatch.setattr(generation, "contact_sheet", lambda *a, **k: built.append(1))
    cfg = EvalConfig(toy=ToyWorldConfig(groups=1, seed=5, image_size=[32, 48], min_shots=2, max_shots=2))
    (story,) = load_benchmark(cfg, tmp_path).stories
    shots, sheet = generation.draw_story(_Drawer(None, None), story, "r2s", (32, 48), 0, 1, sheet=False)
    assert sheet is None and not built and len(shots) == 2


def test_a_resumed_run_does_not_draw_its_checkpoint_step_again(tmp_path):
    """Under gradient accumulation global_step stays at the checkpoint's step for the resumed run's first batches;
    that step was drawn (and scored) before the checkpoint was saved."""
    cfg = load_config("smoke", ["trainer.sample.every_n_steps=2", "eval.callback.every_n_steps=2"])
    sample, metrics = SampleStoryboard(cfg, tmp_path), StoryboardMetrics(cfg, tmp_path)
    drawn = []
    sample.draw = lambda pl_module, val_set, step, sheet=True: (
        drawn.append(("sample", step)) or Image.new("RGB", (8, 8))
    )
    metrics._setup = lambda pl_module, rank: None
    metrics.draw = lambda pl_module, sheets=True: drawn.append(("eval", metrics.last_step)) or []
    metrics.score = lambda draws: ({}, Image.new("RGB", (8, 8)))
    pl_module = SimpleNamespace(adapter=_adapter(degree=1))
    for callback in (sample, metrics):
        callback.on_train_start(_trainer(0, 2), pl_module)
        for step in (2, 3, 3, 4):  # the second micro-batch of step 2, both of step 3, the first of step 4
            callback.on_train_batch_end(_trainer(0, step), pl_module, None, None, 0)
    assert drawn == [("sample", 4), ("eval", 4)]
