"""DeepSpeed with two ranks, on its CPU accelerator (gloo): ZeRO splits the LoRA's fp32 master weights between the
ranks, so the paths only several ranks exercise really run. The run's LoRA files and each checkpoint's LoRA copy
are the masters assembled from both ranks' partitions (`callbacks.gathered_lora`); with `optim.ema_decay` each
rank averages its own fragment of each master, the checkpoints hold the average assembled whole, and at the end the
average is written into both ranks' masters before the export (`LoraEma`); both ranks write a checkpoint folder
that rank 0 commits whole (`LoraDeepSpeedStrategy.save_checkpoint`), and a two-rank run resumed from it reaches
the uninterrupted run, its average included. ZeRO-3 runs twice: with every weight partitioned (persistence threshold
0), and under DeepSpeed's default `stage3_param_persistence_threshold`, which leaves the tiny model's small weights
whole on every rank (persistent) while their fp32 masters stay split, as a full-size run's biases and norms are.

The runs are subprocesses executing this file, `python tests/test_deepspeed_ranks.py STAGE THRESHOLD OUT [CKPT]`
(THRESHOLD: a persistence threshold, or `default` for DeepSpeed's; Lightning's
launcher starts rank 1 by running the same command again), through tests/test_strategy.py's CPU shim.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_strategy import (
    EMA_DECAY,
    FAST,
    TRAINER_OF_STAGE,
    MastersAndEma,
    _fp32_masters,
    _recorded,
    _run_on_deepspeeds_cpu_accelerator,
    assert_holds_the_average,
    assert_is_the_masters_ema,
)

from dreamshot.inference.loading import _module_lora
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY, EXPORT_FILES
from dreamshot.training.ema import LoraEma
from dreamshot.training.strategy import build_strategy

RANKS = 2
STEPS, EVERY = 4, 2
# The runs: (ZeRO stage, ZeRO-3's persistence threshold, None for DeepSpeed's default).
PARTITIONED = [(2, 0), (3, 0)]
RUN_KINDS = pytest.mark.parametrize(
    ("stage", "threshold"), [*PARTITIONED, (3, None)], ids=["zero2", "zero3", "zero3-persistent"]
)
CHECKPOINTS = ["last.ckpt", *(f"step{step:06d}.ckpt" for step in range(EVERY, STEPS + 1, EVERY))]


def _train(stage: int, threshold: int | None, out: Path, ckpt_path: str | None) -> None:
    from dreamshot.config.load import load_config
    from dreamshot.training import train as train_module

    cfg = load_config(
        "smoke",
        [
            *FAST,
            f"trainer={TRAINER_OF_STAGE[stage]}",
            f"trainer.devices={RANKS}",
            # Compiling is not what runs on two ranks here, and costs minutes on CPU.
            "trainer.compile_blocks=false",
            f"trainer.max_steps={STEPS}",
            f"trainer.checkpoint_every_n_steps={EVERY}",
            "trainer.val_check_interval=100",
            f"output_dir={out}",
            f"optim.ema_decay={EMA_DECAY}",
            *([f"trainer.ckpt_path={ckpt_path}"] if ckpt_path else []),
        ],
    )
    cfg.trainer.accelerator = "cpu"  # after validation, which wants DeepSpeed on GPUs

    def build(trainer, micro_batch):
        strategy = build_strategy(trainer, micro_batch)
        if threshold is not None:  # 0: partition even the tiny model's weights, so ZeRO-3 really gathers them
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
        _run_on_deepspeeds_cpu_accelerator(strategy)
        return strategy

    train_module.build_strategy = build
    train_module.train(cfg, callbacks=[MastersAndEma(out.parent)])


def _launch(stage: int, threshold: int | None, out: Path, ckpt_path: Path | None = None) -> Path:
    setting = "default" if threshold is None else str(threshold)
    command = [sys.executable, __file__, str(stage), setting, str(out), *([str(ckpt_path)] if ckpt_path else [])]
    # One thread per rank: the two share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders of the two-rank trainings, made on first use, keyed by (ZeRO stage, persistence threshold)."""
    made: dict[tuple[int, int | None], Path] = {}

    def run(stage: int, threshold: int | None) -> Path:
        if (stage, threshold) not in made:
            folder = tmp_path_factory.mktemp(f"zero{stage}_{threshold}")
            made[stage, threshold] = _launch(stage, threshold, folder / "run")
        return made[stage, threshold]

    return run


def _rank_states(checkpoint: Path, kind: str) -> list[dict]:
    """The `kind` files (`model_states`, `optim_states`) of a DeepSpeed checkpoint folder, rank 0's first."""
    paths = sorted((checkpoint / "checkpoint").glob(f"*_{kind}.pt"))
    return [torch.load(path, map_location="cpu", weights_only=False) for path in paths]


def _assert_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key].dtype == torch.float32 and torch.equal(found[key], value), key


@pytest.mark.slow
@RUN_KINDS
def test_two_ranks_split_the_masters_and_assemble_them_for_the_lora_copies(runs, stage, threshold):
    run = runs(stage, threshold)
    last = run / "checkpoints" / "last.ckpt"
    # Both ranks' shards committed by rank 0, nothing half-written left beside them.
    assert sorted(path.name for path in last.parent.iterdir()) == CHECKPOINTS
    optim = _rank_states(last, "optim_states")
    assert len(optim) == RANKS
    model = _rank_states(last, "model_states")
    assert len(model) == (RANKS if stage == 3 else 1)
    assert all(states["global_step"] == STEPS and states["dp_world_size"] == RANKS for states in model)
    masters = _fp32_masters(last)  # DeepSpeed's own assembly of the ranks' partitions
    total = sum(value.numel() for value in masters.values())
    groups = "single_partition_of_fp32_groups" if stage == 2 else "fp32_flat_groups"
    partitions = [sum(group.numel() for group in rank["optimizer_state_dict"][groups]) for rank in optim]
    # Split, not whole on each rank (at most the alignment padding over half).
    assert all(0 < numel < total for numel in partitions) and sum(partitions) >= total
    for states in model:  # ZeRO-3: each rank's model states hold the copy it assembled
        _assert_equal(states[CHECKPOINT_LORA_KEY], masters)
    # The average assembled whole (ZeRO-3: in each rank's model states, which that rank resumes from).
    average = _module_lora(_average(model[0]))
    assert any(not torch.equal(average[key], masters[key]) for key in masters), "the average is the masters"
    for states in model[1:]:
        _assert_equal(_module_lora(_average(states)), average)
    # Both ranks wrote their part of it into their masters, which the export assembles.
    _assert_equal(load_file(run / EXPORT_FILES["peft"]), average)


def _average(model_states: dict) -> dict[str, torch.Tensor]:
    return model_states["callbacks"][LoraEma.__qualname__]["average"]


@pytest.mark.slow
@RUN_KINDS
def test_each_rank_averages_its_fragment_of_the_fp32_masters(runs, stage, threshold):
    """The EMA under ZeRO: each rank keeps the average of its own fragment of each fp32 master (no collective per
    step), and the run's LoRA file is the EMA of the whole masters, recorded after every step, as each rank's module
    copies are at the end; ZeRO-3's persistent weights too (their fp32 masters are split like the others)."""
    run = runs(stage, threshold)
    recorded = _recorded(run.parent)
    assert len(recorded) == RANKS
    masters = recorded[0]["masters"]
    assert len(masters) == STEPS + 1
    exported = load_file(run / EXPORT_FILES["peft"])
    assert_is_the_masters_ema(exported, masters)
    for rank in recorded:  # the average replaced each rank's module copies too
        assert_holds_the_average(rank["module"], exported)
    sizes = [_module_lora(rank["averaged"]) for rank in recorded]
    assert all(sum(size[key] for size in sizes) == value.numel() for key, value in masters[0].items())
    whole = sum(value.numel() for value in masters[0].values())
    assert all(0 < sum(size.values()) < whole for size in sizes)
    # Under DeepSpeed's default threshold the tiny model's LoRA weights are all persistent, else none is.
    persistent = [set(_module_lora(dict.fromkeys(rank["persistent"])).keys()) for rank in recorded]
    assert all(names == (masters[0].keys() if threshold is None else set()) for names in persistent)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "threshold"), PARTITIONED, ids=["zero2", "zero3"])
def test_a_two_rank_run_resumed_from_its_checkpoint_reaches_the_uninterrupted_run(runs, stage, threshold, tmp_path):
    """Resumed from the step-2 checkpoint of the same config in another folder: its weights and its average (each
    rank's fragment cut from the whole average the checkpoint holds). Bit for bit: on CPU both runs reduce in the
    same order, and steps 3 and 4 move each LoRA weight by about 2e-4, which a bf16 tolerance would forgive
    whatever the resume had restored."""
    whole = runs(stage, threshold)
    resumed = _launch(stage, threshold, tmp_path / "run", ckpt_path=whole / "checkpoints" / f"step{EVERY:06d}.ckpt")
    last = resumed / "checkpoints" / "last.ckpt"
    assert sorted(path.name for path in last.parent.iterdir()) == CHECKPOINTS[:1] + CHECKPOINTS[2:]
    model = _rank_states(last, "model_states")[0]
    assert model["global_step"] == STEPS
    expected = _rank_states(whole / "checkpoints" / "last.ckpt", "model_states")[0]
    _assert_equal(model[CHECKPOINT_LORA_KEY], expected[CHECKPOINT_LORA_KEY])
    _assert_equal(_average(model), _average(expected))
    _assert_equal(load_file(resumed / EXPORT_FILES["peft"]), load_file(whole / EXPORT_FILES["peft"]))


if __name__ == "__main__":
    stage, setting, out, *ckpt = sys.argv[1:]
    _train(int(stage), None if setting == "default" else int(setting), Path(out), ckpt[0] if ckpt else None)
