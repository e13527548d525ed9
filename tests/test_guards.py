"""Numerical guard, output-folder checks, and the package's loading hygiene."""

import errno
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from dreamshot.config.load import load_config
from dreamshot.training import checkpoint_io
from dreamshot.training.guards import TrainingDivergedError, checkpoint_bytes
from dreamshot.training.module import DreamShotModule
from dreamshot.training.train import train
from dreamshot.utils.errors import DreamShotError

FAST = ["logger=csv", "data.toy.groups=4", "data.val_groups=1", "data.toy.max_shots=3", "data.toy.max_roles=2"]
PACKAGE = Path(__file__).resolve().parents[1] / "dreamshot"


def _poison_step(monkeypatch, bad_step: int):
    """Make the velocity prediction NaN at one global step."""
    original = DreamShotModule.model_step

    def model_step(self, batch, plan, generator, racl_weight=0.0, diagnostic=False):
        losses = original(self, batch, plan, generator, racl_weight, diagnostic)
        if self.training and self.global_step == bad_step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(DreamShotModule, "model_step", model_step)


def test_nonfinite_loss_stops_the_run_naming_step_and_terms(tmp_path, monkeypatch):
    _poison_step(monkeypatch, bad_step=2)
    cfg = load_config("smoke", [*FAST, f"output_dir={tmp_path}", "trainer.checkpoint_every_n_steps=1"])
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step 2 \(loss=nan, loss_fm="):
        train(cfg)
    last_good = torch.load(tmp_path / "checkpoints" / "step000002.ckpt", weights_only=True)
    assert last_good["global_step"] == 2 and all(torch.isfinite(v).all() for v in last_good["state_dict"].values())


@pytest.mark.parametrize("scaled", [False, True])
def test_overflowing_gradients_are_left_to_the_fp16_grad_scaler(scaled):
    # Under 16-mixed the GradScaler skips a step whose gradients overflowed and lowers its scale; it grows the scale
    # back until the next overflow, so overflows recur by design and must not count as a diverged run.
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = DreamShotModule(load_config("smoke", FAST))
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if scaled else []
    module.trainer = L.Trainer(accelerator="cpu", plugins=plugins, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    for p in module.adapter.trainable_parameters():
        p.grad = torch.full_like(p, float("inf"))
    if not scaled:
        with pytest.raises(TrainingDivergedError, match="non-finite gradients"):
            module.on_before_optimizer_step(optimizer)
        return
    module.on_before_optimizer_step(optimizer)
    assert module.nonfinite_skips == 0
    assert all(p.grad is not None for p in module.adapter.trainable_parameters())  # for the scaler to see


def test_nonfinite_steps_can_be_skipped(tmp_path, monkeypatch):
    _poison_step(monkeypatch, bad_step=1)
    cfg = load_config("smoke", [*FAST, f"output_dir={tmp_path}", "trainer.max_nonfinite_steps=1"])
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite_skips"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_output_dir_under_a_file_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = load_config("smoke", [*FAST, f"output_dir={blocker / 'run'}"])
    with pytest.raises(DreamShotError, match=r"file/run: not a folder \(.*file is a file\)"):
        train(cfg)


def test_the_disk_estimate_covers_a_real_checkpoint(tmp_path):
    out = train(load_config("smoke", [*FAST, f"output_dir={tmp_path}", "trainer.max_steps=2"]))
    module = DreamShotModule(load_config("smoke", FAST))
    estimate = checkpoint_bytes(module.adapter.trainable_parameters(), max_steps=2)
    real = (out / "checkpoints" / "last.ckpt").stat().st_size
    assert real <= estimate <= 2 * real


def test_a_disk_that_fills_mid_run_says_so_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    saved = []

    def save(checkpoint, f):  # the disk is full once step 1's checkpoint is written (before its last.ckpt)
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(checkpoint["global_step"])
        real_save(checkpoint, f)

    real_save = torch.save
    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    cfg = load_config("smoke", [*FAST, f"output_dir={tmp_path}", "trainer.checkpoint_every_n_steps=1"])
    with pytest.raises(
        DreamShotError, match=r"no space left on the disk of output_dir .* at step 1: checkpoints up to step 1 intact"
    ):
        train(cfg)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoints" / "step000001.ckpt", weights_only=True)["global_step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_too_little_disk_is_reported_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    cfg = load_config("smoke", [*FAST, f"output_dir={tmp_path}"])
    with pytest.raises(DreamShotError, match="GiB free"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
]


def test_package_loads_weights_only_safely():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for pattern, what in UNSAFE:
            offences += [f"{path.relative_to(PACKAGE)}: {what}" for _ in pattern.finditer(text)]
    assert not offences, offences


def test_unsafe_load_detector_catches_an_unsafe_load():
    assert UNSAFE[0][0].search("state = torch.load(path, map_location='cpu')")
    assert not UNSAFE[0][0].search("state = torch.load(path, map_location='cpu', weights_only=True)")
