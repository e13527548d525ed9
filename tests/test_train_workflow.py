"""What a run leaves for the people running it: progress lines in a log, its W&B run continued on resume, a CSV
beside W&B, the newest checkpoints only, an averaged LoRA, a decaying learning rate, storyboards drawn while it
trains. The tiny Wan on a few toy storyboards, a few steps each."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.training.ema import ema_update
from dreamshot.training.progress import WIDTH, StepProgress, losses, progress_line
from dreamshot.training.schedule import lr_factor
from dreamshot.training.train import WANDB_RUN_ID_FILE, train

FAST = ["data.toy.groups=4", "data.val_groups=1", "data.toy.max_shots=3", "data.toy.max_roles=2"]


def _config(out: Path, *overrides: str):
    return load_config("smoke", [*FAST, f"output_dir={out}", *overrides])


def test_progress_lines_fit_a_terminal_and_give_step_phase_loss_speed_and_eta():
    values = losses({"train/loss": 0.91, "train/loss_fm": 0.8, "train/loss_racl": 1.1}, racl=True)
    line = progress_line(120, 20000, "phase 1/2", values, rate=1.93, terminal=True)
    assert len(line) <= WIDTH and "120/20000" in line and "ETA 2:51:4" in line
    plain = progress_line(120, 20000, "phase 1/2", values, rate=1.93, terminal=False)
    assert plain.startswith("step 120/20000 | phase 1/2 | loss 0.9100 | fm 0.8000 | racl 1.1000 | 1.93 it/s | ETA 2:")
    # A RACL-free phase shows the total alone, not the last phase-1 value of loss_racl.
    assert losses({"train/loss": 0.7, "train/loss_fm": 0.7, "train/loss_racl": 1.1}, racl=False) == {"loss": 0.7}


def test_without_a_terminal_a_line_is_printed_every_n_steps(tmp_path: Path):
    stream = io.StringIO()  # not a terminal, like a SLURM log
    progress = StepProgress(phases=0, every_n_steps=2, stream=stream)

    class Probe(L.Callback):
        def setup(self, trainer, pl_module, stage):
            trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, StepProgress)]
            trainer.callbacks.insert(0, progress)

    train(_config(tmp_path / "run", "logger=csv", "trainer.log_every_n_steps=2"), callbacks=[Probe()])
    lines = [line for line in stream.getvalue().splitlines() if "| validation" not in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" | pass " in line and " | loss " in line and " it/s | ETA " in line for line in lines)
    assert "| validation | val/loss" in stream.getvalue()


def _offline_run_ids(out: Path) -> list[str]:
    # The id from each run's log file: a folder's name gains a "-1" suffix when two launches start in one second.
    return [path.stem.removeprefix("run-") for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]


def test_a_resumed_run_continues_its_wandb_run_and_logs_a_csv_beside_it(tmp_path: Path):
    first = train(_config(tmp_path / "run", "trainer.max_steps=2"))
    run_id = (first / WANDB_RUN_ID_FILE).read_text().strip()
    assert _offline_run_ids(first) == [run_id]
    resumed = train(
        _config(tmp_path / "run", "trainer.max_steps=4", f"trainer.ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    )
    # Two offline runs with one id: synced, they are one W&B run (W&B resumes it), not two of the same name.
    assert _offline_run_ids(resumed) == [run_id, run_id]
    other = train(_config(tmp_path / "other", "trainer.max_steps=1"))
    assert _offline_run_ids(other) != [run_id]
    # The metrics reports read, written beside W&B: one CSV version per launch.
    with open(resumed / "csv" / "version_1" / "metrics.csv") as f:
        steps = {int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert steps == {2, 3}


class Watch(L.Callback):
    """The learning rate of every optimizer step and the LoRA weights after it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = self._lora(pl_module)

    @staticmethod
    def _lora(pl_module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(self._lora(pl_module))


@pytest.fixture(scope="module")
def extras_run(tmp_path_factory):
    """4 steps: a cosine schedule after one warm-up step, an EMA of the LoRA, two checkpoints kept, a storyboard
    drawn every 2 steps."""
    out = tmp_path_factory.mktemp("extras") / "run"
    watch = Watch()
    overrides = [
        "logger=csv",
        "optim.lr=0.01",
        "optim.warmup_steps=1",
        "optim.schedule=cosine",
        "optim.min_lr_ratio=0.1",
        "optim.ema_decay=0.5",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.keep_last_checkpoints=2",
        "trainer.sample.every_n_steps=2",
        "trainer.sample.steps=1",
    ]
    train(_config(out, *overrides), callbacks=[watch])
    return out, watch


def test_only_the_newest_checkpoints_are_kept(extras_run):
    out, _ = extras_run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step000003.ckpt",
        "step000004.ckpt",
    ]


def test_the_learning_rate_warms_up_then_follows_the_cosine(extras_run):
    _, watch = extras_run
    expected = [0.01 * lr_factor(step, 1, 4, "cosine", 0.1) for step in range(4)]
    assert watch.lrs == pytest.approx(expected)
    assert watch.lrs[1] == pytest.approx(0.01) and watch.lrs[1] > watch.lrs[2] > watch.lrs[3] > 0.001


def test_learning_rate_schedules():
    assert [lr_factor(s, 2, 10, "constant", 0.0) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine", 0.1) == 1.0 and lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(6, 2, 10, "linear", 0.2) == pytest.approx(0.6)


def test_the_lora_files_hold_the_average_of_the_weights(extras_run):
    out, watch = extras_run
    average = {name: value.clone() for name, value in watch.initial.items()}
    for weights in watch.weights:
        for name, value in weights.items():
            ema_update(average[name], value, 0.5)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(last["callbacks"]["LoraEma"]["average"]) == set(average)  # a resume continues the average
    lora = load_file(out / "lora.safetensors")
    for name, value in average.items():
        key = name.removeprefix("adapter.transformer.").replace(".default.", ".")
        torch.testing.assert_close(lora[key], value)
        # The checkpoint keeps the trained weights themselves.
        torch.testing.assert_close(last["state_dict"][name], watch.weights[-1][name])
    assert any(not torch.equal(last["state_dict"][name], average[name]) for name in average)


def test_a_resumed_average_equals_an_uninterrupted_one(tmp_path: Path):
    ema = ["logger=csv", "optim.ema_decay=0.7", "optim.lr=0.01"]
    straight = train(_config(tmp_path / "straight", *ema))
    first = train(_config(tmp_path / "resumed", *ema, "trainer.max_steps=2"))
    resumed = train(_config(tmp_path / "resumed", *ema, f"trainer.ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    a, b = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_a_storyboard_is_drawn_every_n_steps_above_its_ground_truth(extras_run):
    out, _ = extras_run
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000002.png", "step000004.png"]
    with Image.open(out / "samples" / "step000004.png") as sheet:
        assert sheet.width > 512 and sheet.height > 200


def test_ema_update_is_the_moving_average():
    average = torch.tensor([1.0, 2.0])
    ema_update(average, torch.tensor([3.0, 0.0]), 0.75)
    assert average.tolist() == [1.5, 1.5] and not math.isnan(average.sum())


def test_training_a_full_size_model_without_weights_is_refused_before_anything_is_built(tmp_path: Path):
    from dreamshot.utils.errors import ConfigError

    cfg = _config(tmp_path / "run", "model=wan1_3b")
    with pytest.raises(ConfigError, match="model.pretrained_path is not set"):
        train(cfg)
    assert not (tmp_path / "run").exists()
