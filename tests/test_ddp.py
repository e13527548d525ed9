"""Data-parallel training on CPU: two DDP processes over gloo (trainer=ddp_cpu).

The run is a subprocess executing this file, `python tests/test_ddp.py OUT` (Lightning's DDP launcher starts
rank 1 by running the same command again), so it can pass a recording callback to `train()`: each rank writes
the storyboard ids it trained on and its final LoRA weights next to the run's own outputs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamshot.training.callbacks import EXPORT_FILES

RANKS = 2
STEPS = 2
OVERRIDES = [
    "trainer=ddp_cpu",
    "logger=csv",
    # 4 training groups, batch 1: two batches per rank and no padding, so the ranks see disjoint groups; the
    # 2 validation groups are one batch per rank.
    "data.toy.groups=6",
    "data.val_groups=2",
    "data.toy.max_shots=3",
    "data.toy.max_roles=2",
    f"trainer.max_steps={STEPS}",
    f"trainer.checkpoint_every_n_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
]


class RecordRank(L.Callback):
    """Writes `ids_rank<r>.json` (storyboard ids in training order), `val_rank<r>.json` (the validation ids and the
    val/loss the rank ends its validation with) and `lora_rank<r>.safetensors` per rank."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir, self.ids, self.val_ids = output_dir, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids += batch.ids

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_ids += batch.ids

    def on_validation_end(self, trainer, pl_module) -> None:
        record = {"ids": self.val_ids, "loss": float(trainer.callback_metrics["val/loss"])}
        (self.output_dir / f"val_rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        (self.output_dir / f"ids_rank{rank}.json").write_text(json.dumps(self.ids))
        lora = {k: v.detach().clone().contiguous() for k, v in pl_module.adapter.lora_state_dict().items()}
        save_file(lora, self.output_dir / f"lora_rank{rank}.safetensors")


def _train(output_dir: Path, *overrides: str) -> None:
    from dreamshot.config.load import load_config
    from dreamshot.training.train import train

    config = load_config("smoke", [*OVERRIDES, *overrides, f"output_dir={output_dir}"])
    train(config, callbacks=[RecordRank(output_dir)])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    out.mkdir()
    # One thread per process: the two ranks share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ranks_train_on_different_storyboards(ddp_run):
    ids = [json.loads((ddp_run / f"ids_rank{rank}.json").read_text()) for rank in range(RANKS)]
    assert all(len(rank_ids) == STEPS for rank_ids in ids)
    assert set(ids[0]).isdisjoint(ids[1])


@pytest.mark.slow
def test_validation_loss_is_the_mean_over_every_ranks_batches(ddp_run):
    ranks = [json.loads((ddp_run / f"val_rank{rank}.json").read_text()) for rank in range(RANKS)]
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])
    with open(ddp_run / "csv" / "version_0" / "metrics.csv") as f:
        (logged,) = [float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"]]
    # Not rank 0's half of the validation set: the value is reduced over the ranks.
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"]) == pytest.approx(logged)


@pytest.mark.slow
def test_exported_lora_equals_every_rank(ddp_run):
    exported = load_file(ddp_run / EXPORT_FILES["peft"])
    assert any(value.abs().sum() > 0 for key, value in exported.items() if ".lora_B." in key), "LoRA never trained"
    for rank in range(RANKS):
        weights = load_file(ddp_run / f"lora_rank{rank}.safetensors")
        assert weights.keys() == exported.keys()
        for key, value in weights.items():
            # Gradients are all-reduced before every step, so the ranks hold bit-identical weights.
            assert torch.equal(value, exported[key]), f"rank {rank} differs at {key}"


@pytest.mark.slow
def test_rank_zero_writes_every_format_and_a_lora_only_checkpoint(ddp_run):
    assert all((ddp_run / name).is_file() for name in EXPORT_FILES.values())
    checkpoint = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"])


def _val_loss(out: Path, *overrides: str) -> float:
    """The val/loss a run of this file's config (plus `overrides`) logs, run as a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, __file__, str(out), "plain", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        (logged,) = [float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"]]
    return logged


@pytest.mark.slow
def test_validation_loss_of_two_ranks_equals_one_process_on_an_odd_validation_set(tmp_path):
    # 3 validation groups in batches of 1: rank 1 pads its share with a repeat of the first, which counted twice.
    # A vanishing learning rate keeps the two runs' weights equal, so only the reduction can tell them apart.
    odd = ["data.toy.groups=7", "data.val_groups=3", "optim.lr=1e-12"]
    two_ranks = _val_loss(tmp_path / "ddp", *odd)
    one_process = _val_loss(tmp_path / "single", *odd, "trainer=cpu")
    assert two_ranks == pytest.approx(one_process, rel=1e-6)


def _poison_rank_one(step: int) -> None:
    """Rank 1's loss is NaN at `step`; rank 0's stays finite."""
    from dreamshot.training.module import DreamShotModule

    original = DreamShotModule.model_step

    def model_step(self, batch, plan, generator, racl_weight=0.0, diagnostic=False):
        losses = original(self, batch, plan, generator, racl_weight, diagnostic)
        if self.training and self.global_rank == 1 and self.global_step == step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    DreamShotModule.model_step = model_step


def _run_poisoned(out: Path, skips: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, __file__, str(out), "poison", f"trainer.max_nonfinite_steps={skips}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    # Before: rank 1 stopped alone; rank 0 learnt of it from a broken connection, not from the guard.
    result = _run_poisoned(tmp_path, skips=0)
    assert result.returncode != 0
    assert "non-finite loss at step 1" in result.stderr
    assert "non-finite loss on another rank at step 1" in result.stderr


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    # Before: rank 1 skipped its backward alone and the ranks' gradient all-reduces no longer paired up.
    result = _run_poisoned(tmp_path, skips=1)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"lora_rank{rank}.safetensors") for rank in range(RANKS)]
    assert all(torch.equal(value, ranks[1][key]) for key, value in ranks[0].items())


if __name__ == "__main__":
    if sys.argv[2:3] == ["poison"]:
        _poison_rank_one(step=1)
    _train(Path(sys.argv[1]), *sys.argv[3:])
