"""A DeepSpeed checkpoint is never left half-written: `LoraDeepSpeedStrategy` writes each checkpoint folder beside
its final name and renames it into place, and resume and export read the checkpoint a killed save left whole.

The fast tests drive the strategy's save with an engine that writes DeepSpeed's files and can be killed between
them; the slow one kills a real DeepSpeed save (CPU accelerator, a subprocess running this file, as in
tests/test_strategy.py) after its model states and resumes the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_strategy import FAST, TRAINER_OF_STAGE, _run_on_deepspeeds_cpu_accelerator

from dreamshot.commands.export import source_weights
from dreamshot.config.load import load_config
from dreamshot.config.schema import ContextParallelConfig
from dreamshot.inference.loading import RUN_CONFIG, run_weights
from dreamshot.training.resume import read_resume, resume_path
from dreamshot.training.strategy import LoraDeepSpeedStrategy, build_strategy
from dreamshot.training.train import _intact
from dreamshot.utils.io import backup_folder, partial_folder

MODEL_STATES = "checkpoint/mp_rank_00_model_states.pt"
OPTIM_STATES = "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Killed(Exception):
    pass


class DeepSpeedFiles:
    """Writes a checkpoint folder as DeepSpeed's engine lays it out (model states, then optimiser states, then
    `latest`), killed after the model states when `kill` is set."""

    def __init__(self) -> None:
        self.kill = False

    def save_checkpoint(self, save_dir, client_state, tag, exclude_frozen_parameters) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        step = client_state["global_step"]
        torch.save({"global_step": step}, Path(save_dir) / MODEL_STATES)
        if self.kill:
            raise Killed
        torch.save({"step": step}, Path(save_dir) / OPTIM_STATES)
        (Path(save_dir) / "latest").write_text(tag)


def _strategy() -> LoraDeepSpeedStrategy:
    strategy = LoraDeepSpeedStrategy(ContextParallelConfig(), stage=2, exclude_frozen_parameters=True)
    strategy.model = DeepSpeedFiles()  # `deepspeed_engine`
    return strategy


def _steps(folder: Path) -> tuple[int, int]:
    """The steps of a checkpoint folder's model states and optimiser states."""
    model = torch.load(folder / MODEL_STATES, weights_only=True)["global_step"]
    return model, torch.load(folder / OPTIM_STATES, weights_only=True)["step"]


def _run(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / RUN_CONFIG).write_text("")
    return out, out / "checkpoints" / "last.ckpt"


def _last(out: Path) -> Path | None:
    return resume_path(SimpleNamespace(trainer=SimpleNamespace(ckpt_path="last")), out)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    out, last = _run(tmp_path)
    strategy = _strategy()
    strategy.save_checkpoint({"global_step": 2}, last)
    strategy.deepspeed_engine.kill = True
    with pytest.raises(Killed):
        strategy.save_checkpoint({"global_step": 4}, last)
    assert _steps(last) == (2, 2)  # not step 4's model states beside step 2's optimiser states
    assert _intact(SimpleNamespace(strategy=strategy)) == "checkpoints up to step 2 intact"  # the crash's message
    assert _last(out) == last and run_weights(out) == last
    strategy.deepspeed_engine.kill = False
    strategy.save_checkpoint({"global_step": 6}, last)
    assert _steps(last) == (6, 6)
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.ckpt"]  # the partial folder removed


def test_a_save_killed_between_its_renames_is_read_from_the_backup(tmp_path, monkeypatch):
    out, last = _run(tmp_path)
    strategy = _strategy()
    strategy.save_checkpoint({"global_step": 2}, last)
    rename = os.rename

    def killed_after_the_first(source, target):
        if Path(source) == partial_folder(last):
            raise Killed
        rename(source, target)

    monkeypatch.setattr(os, "rename", killed_after_the_first)
    with pytest.raises(Killed):
        strategy.save_checkpoint({"global_step": 4}, last)
    monkeypatch.setattr(os, "rename", rename)
    assert not last.exists()
    backup = backup_folder(last)
    assert _last(out) == backup and _steps(backup) == (2, 2)
    assert resume_path(SimpleNamespace(trainer=SimpleNamespace(ckpt_path=str(last))), out) == backup
    assert run_weights(out) == backup  # `dreamshot export <run>`
    assert source_weights(last) == backup  # `dreamshot export <run>/checkpoints/last.ckpt`
    strategy.save_checkpoint({"global_step": 6}, last)
    assert _steps(last) == (6, 6)
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.ckpt"]


def test_nothing_lists_a_partial_or_backup_folder_as_a_checkpoint(tmp_path):
    out, last = _run(tmp_path)
    strategy = _strategy()
    strategy.deepspeed_engine.kill = True
    with pytest.raises(Killed):
        strategy.save_checkpoint({"global_step": 2}, last)
    assert partial_folder(last).is_dir()
    assert _last(out) is None  # a first save killed: the run starts afresh
    steps = list((out / "checkpoints").glob("step*.ckpt")) + list(out.glob("hpc_ckpt_*.ckpt"))
    assert not steps  # KeepNewestCheckpoints' and the SLURM requeue's listings


# --- the real DeepSpeed engine (CPU accelerator) ------------------------------------------------------------

STEPS, EVERY = 4, 2


def _train(out: Path, kill_last_save_at: int | None) -> None:
    """Train ZeRO-2 on DeepSpeed's CPU accelerator for STEPS steps (`trainer.ckpt_path=last`), the save of
    `last.ckpt` at step `kill_last_save_at` killed once its model states are written."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from dreamshot.training import train as train_module

    cfg = _config(out)
    save_zero_checkpoint = DeepSpeedEngine._save_zero_checkpoint

    def killed_after_the_model_states(engine, save_dir, tag):
        if "last.ckpt" in str(save_dir) and engine.global_steps == kill_last_save_at:
            raise Killed(f"killed while saving last.ckpt at step {engine.global_steps}")
        save_zero_checkpoint(engine, save_dir, tag)

    DeepSpeedEngine._save_zero_checkpoint = killed_after_the_model_states

    def build(trainer, micro_batch):
        strategy = build_strategy(trainer, micro_batch)
        _run_on_deepspeeds_cpu_accelerator(strategy)
        return strategy

    train_module.build_strategy = build
    train_module.train(cfg)


def _config(out: Path):
    cfg = load_config(
        "smoke",
        [
            *FAST,
            f"trainer={TRAINER_OF_STAGE[2]}",
            "trainer.devices=1",
            f"trainer.max_steps={STEPS}",
            f"trainer.checkpoint_every_n_steps={EVERY}",
            "trainer.val_check_interval=100",
            "trainer.ckpt_path=last",
            f"output_dir={out}",
        ],
    )
    cfg.trainer.accelerator = "cpu"
    return cfg


def _train_in_subprocess(out: Path, kill_last_save_at: int | None) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, str(out), str(kill_last_save_at or 0)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _model_states(folder: Path) -> dict:
    return torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_real_deepspeed_save_killed_mid_write_leaves_last_ckpt_resumable(tmp_path):
    out = tmp_path / "run"
    killed = _train_in_subprocess(out, kill_last_save_at=STEPS)
    assert killed.returncode != 0 and f"killed while saving last.ckpt at step {STEPS}" in killed.stderr
    last = out / "checkpoints" / "last.ckpt"
    assert _model_states(partial_folder(last))["global_step"] == STEPS  # the kill came after the model states
    assert _model_states(last)["global_step"] == EVERY
    resume = read_resume(resume_path(_config(out), out), _config(out))
    assert (resume.path, resume.step) == (last, EVERY)

    resumed = _train_in_subprocess(out, kill_last_save_at=None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _model_states(last)["global_step"] == STEPS
    assert not partial_folder(last).exists() and not backup_folder(last).exists()


if __name__ == "__main__":
    _train(Path(sys.argv[1]), int(sys.argv[2]) or None)
