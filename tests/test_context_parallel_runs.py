"""Context-parallel runs on CPU against their one-process twins, through the real launchers.

Training (toy_long_storyboard: two gloo processes share every storyboard): the same batches, the same losses, the
same training sample (`trainer.sample`) and storyboard metrics (`eval.callback`, on the toy benchmark), both drawn
by both ranks together, and the same LoRA as one process, with Ulysses and with ring attention, and after a SIGTERM
and a resume. The CP run is a
subprocess executing this file, `python tests/test_context_parallel_runs.py OUT [--ring | --zero2 | --sigterm-at K |
--resume]` (Lightning's DDP launcher starts rank 1 by running the same command again), so it can pass recording and
signalling callbacks to `train()` and install test shims in both ranks.

Sampling: `torchrun --nproc-per-node 2 -m dreamshot.cli generate ... inference.context_parallel.degree=2` draws
the shots one process draws.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.training.callbacks import EXPORT_FILES
from dreamshot.training.strategy import build_strategy
from dreamshot.training.train import train

STEPS = 3
OVERRIDES = [
    "logger=csv",
    # Rank 0's group draws a storyboard together at step 2 (the same one as the one-process twin).
    "trainer.sample.every_n_steps=2",
    "trainer.sample.steps=1",
    # And scores one toy-benchmark story at step 3 (rank 0 alone builds the metrics and logs them).
    "eval.callback.enabled=true",
    "eval.callback.every_n_steps=3",
    "eval.callback.steps=1",
    "eval.callback.stories=1",
    "eval.toy.groups=1",
    "eval.toy.image_size=[32,48]",
    "eval.toy.max_shots=2",
    "data.toy.groups=3",
    f"trainer.max_steps={STEPS}",
    f"trainer.checkpoint_every_n_steps={STEPS}",
    "trainer.val_check_interval=100",
]
# ZeRO-2 in float32, so that it can equal the float32 twin.
ZERO2 = ["trainer.strategy=deepspeed_stage_2", "trainer.precision=32-true"]
# Ring as on GPUs (trainer=ddp / gpu checkpoint the blocks); toy_long_storyboard's 2x3 tokens per frame, which
# degree 2 divides (ring cannot pad).
RING = ["trainer.context_parallel.attention=ring", "trainer.gradient_checkpointing=true"]
# The twin: one process, no context parallelism, and windows as long as the CP run's (whole storyboards).
ALONE = ["trainer=cpu", "trainer.context_parallel.degree=1", "data.max_shots=30"]


class RecordBatches(L.Callback):
    """Writes `batches_rank<r>.json` ([ids, shots, loss] per step), `context_parallel_rank<r>` (the context-parallel
    degree and attention the adapter ran with), `sampling_rank<r>.json` and `.safetensors` (the step and
    context-parallel degree, and the prediction, of each forward outside training mode: the sample's at step 2, the
    storyboard metrics' at step 3) and `lora_rank<r>.safetensors` per rank."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir, self.batches, self.sampling, self.predictions = output_dir, [], [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        adapter = pl_module.adapter
        predict_velocity = adapter.predict_velocity

        def recorded(*args, **kwargs):
            velocity = predict_velocity(*args, **kwargs)
            if not adapter.training:
                self.predictions[str(len(self.sampling))] = velocity.detach().clone().contiguous()
                self.sampling.append([trainer.global_step, adapter.context_parallel.degree])
            return velocity

        adapter.predict_velocity = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append([batch.ids, batch.num_shots, float(outputs["loss"])])

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        (self.output_dir / f"batches_rank{rank}.json").write_text(json.dumps(self.batches))
        (self.output_dir / f"sampling_rank{rank}.json").write_text(json.dumps(self.sampling))
        save_file(self.predictions, self.output_dir / f"sampling_rank{rank}.safetensors")
        cp = pl_module.adapter.context_parallel
        (self.output_dir / f"context_parallel_rank{rank}").write_text(f"{cp.degree} {cp.attention}")
        lora = {k: v.detach().clone().contiguous() for k, v in pl_module.adapter.lora_state_dict().items()}
        save_file(lora, self.output_dir / f"lora_rank{rank}.safetensors")


def _train(output_dir: Path, *overrides: str) -> None:
    cfg = load_config("toy_long_storyboard", [*OVERRIDES, *overrides, f"output_dir={output_dir}"])
    train(cfg, callbacks=[RecordBatches(output_dir)])


def _train_with_zero2_on_cpu(output_dir: Path) -> None:
    """toy_long_storyboard under DeepSpeed ZeRO-2, through DeepSpeed's CPU accelerator (test_strategy's shim)."""
    from test_strategy import _run_on_deepspeeds_cpu_accelerator

    from dreamshot.training import train as train_module

    def build(trainer, micro_batch):
        strategy = build_strategy(trainer, micro_batch)
        _run_on_deepspeeds_cpu_accelerator(strategy)
        return strategy

    train_module.build_strategy = build
    cfg = load_config(
        "toy_long_storyboard", [*OVERRIDES, *ZERO2, "trainer.accelerator=gpu", f"output_dir={output_dir}"]
    )
    cfg.trainer.accelerator = "cpu"  # after validation, which wants DeepSpeed on GPUs
    train_module.train(cfg, callbacks=[RecordBatches(output_dir)])


def _train_with_ring_on_cpu(output_dir: Path) -> None:
    """toy_long_storyboard with ring attention, on the test support's CPU ring kernel (cp_support)."""
    from cp_support import install_cpu_ring_kernel

    install_cpu_ring_kernel()
    cfg = load_config("toy_long_storyboard", [*OVERRIDES, *RING, "trainer.accelerator=gpu", f"output_dir={output_dir}"])
    cfg.trainer.accelerator = "cpu"  # after validation, which refuses ring on CPU (no kernel returns the LSE)
    train(cfg, callbacks=[RecordBatches(output_dir)])


def _train_until_sigterm(output_dir: Path, step: int) -> None:
    """toy_long_storyboard with a real SIGTERM to rank 0 alone in step `step` (1-based), as test_crash_resume sends
    it: both ranks finish that step, save `last.ckpt` there and stop (status 143, as `dreamshot train`)."""
    from test_crash_resume import Signal

    from dreamshot.utils.errors import Terminated

    cfg = load_config("toy_long_storyboard", [*OVERRIDES, f"output_dir={output_dir}"])
    signals = [Signal(signal.SIGTERM, step - 1)] if int(os.environ.get("LOCAL_RANK", "0")) == 0 else []
    try:
        train(cfg, callbacks=[RecordBatches(output_dir), *signals])
    except Terminated as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_status)


def _launch(output_dir: Path, *flags: str, status: int = 0) -> Path:
    output_dir.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, __file__, str(output_dir), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == status, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alone") / "run"
    out.mkdir()
    _train(out, *ALONE)
    return out


@pytest.fixture(scope="module", params=["ulysses", "ring"])
def runs(request, tmp_path_factory, alone) -> tuple[Path, Path, str]:
    flags = ["--ring"] if request.param == "ring" else []
    return _launch(tmp_path_factory.mktemp(request.param) / "run", *flags), alone, request.param


@pytest.mark.slow
def test_both_ranks_train_the_same_whole_long_storyboards(runs):
    shared, alone, attention = runs
    ranks = [json.loads((shared / f"batches_rank{rank}.json").read_text()) for rank in range(2)]
    twin = json.loads((alone / "batches_rank0.json").read_text())
    assert [(shared / f"context_parallel_rank{rank}").read_text() for rank in range(2)] == [f"2 {attention}"] * 2
    assert (shared / "samples" / "step000002.png").is_file()
    assert [ids for ids, _, _ in ranks[0]] == [ids for ids, _, _ in ranks[1]] == [ids for ids, _, _ in twin]
    assert all(shots >= 24 for _, shots, _ in ranks[0]), "a storyboard was cut to data.max_shots"
    for (_, _, loss), (_, _, loss_1), (_, _, twin_loss) in zip(*ranks, twin, strict=True):
        assert loss == loss_1 and abs(loss - twin_loss) < 1e-5


def _assert_drawn_by_both_ranks_as_one_process(shared: Path, alone: Path, step: int) -> None:
    """Both ranks ran every sampler forward of step `step` at degree 2, predicting what the twin's predicted."""
    ranks = [json.loads((shared / f"sampling_rank{rank}.json").read_text()) for rank in range(2)]
    twin = json.loads((alone / "sampling_rank0.json").read_text())
    twin_keys = [str(n) for n, (at, _) in enumerate(twin) if at == step]
    assert twin_keys and {degree for at, degree in twin if at == step} == {1}
    twin_predictions = load_file(alone / "sampling_rank0.safetensors")
    for rank, sampling in enumerate(ranks):
        keys = [str(n) for n, (at, _) in enumerate(sampling) if at == step]
        assert [degree for at, degree in sampling if at == step] == [2] * len(twin_keys), f"rank {rank}"
        predictions = load_file(shared / f"sampling_rank{rank}.safetensors")
        for key, twin_key in zip(keys, twin_keys, strict=True):
            value, expected = predictions[key], twin_predictions[twin_key]
            torch.testing.assert_close(value, expected, atol=1e-4, rtol=0, msg=f"rank {rank}: forward {key}")


def _assert_same_sheet(drawn: Path, one: Path) -> None:
    drawn_pixels, one_pixels = np.asarray(Image.open(drawn), dtype=int), np.asarray(Image.open(one), dtype=int)
    assert drawn_pixels.shape == one_pixels.shape
    # 8-bit rounding of shots equal to float tolerance, which the sheet's bicubic upscaling can double.
    assert np.abs(drawn_pixels - one_pixels).max() <= 2


@pytest.mark.slow
def test_the_training_sample_is_drawn_by_the_whole_group_as_one_process_draws_it(runs):
    shared, alone, _ = runs
    _assert_drawn_by_both_ranks_as_one_process(shared, alone, step=2)
    assert sorted(path.name for path in (shared / "samples").iterdir()) == ["step000002.png"]
    _assert_same_sheet(shared / "samples" / "step000002.png", alone / "samples" / "step000002.png")


def _eval_values(run: Path) -> dict[str, float]:
    """The `eval/*` values of the run's CSV log, at the one step they were logged at (3)."""
    (metrics,) = (run / "csv").glob("version_*/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if any(row[k] for k in row if k.startswith("eval/"))]
    (row,) = rows
    assert row["step"] == "3"
    return {key: float(value) for key, value in row.items() if key.startswith("eval/")}


@pytest.mark.slow
def test_the_storyboard_metrics_are_drawn_by_the_whole_group_and_score_as_one_processs(runs):
    shared, alone, _ = runs
    _assert_drawn_by_both_ranks_as_one_process(shared, alone, step=3)
    values, twin = _eval_values(shared), _eval_values(alone)
    assert twin and values.keys() == twin.keys()
    for key, value in values.items():
        assert abs(value - twin[key]) < 1e-3, key
    assert sorted(path.name for path in (shared / "eval_callback").glob("*.png")) == ["step000003.png"]
    _assert_same_sheet(shared / "eval_callback" / "step000003.png", alone / "eval_callback" / "step000003.png")


@pytest.mark.slow
def test_lora_equals_the_one_process_run(runs):
    shared, alone, _ = runs
    exported, twin = load_file(shared / EXPORT_FILES["peft"]), load_file(alone / EXPORT_FILES["peft"])
    assert any(value.abs().sum() > 0 for key, value in twin.items() if ".lora_B." in key), "LoRA never trained"
    assert exported.keys() == twin.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, twin[key], atol=1e-5, rtol=0, msg=key)
    assert torch.load(shared / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS


@pytest.mark.slow
def test_zero2_with_context_parallelism_reaches_the_lora_of_one_process(tmp_path, alone):
    shared = _launch(tmp_path / "zero2", "--zero2")
    assert [(shared / f"context_parallel_rank{rank}").read_text() for rank in range(2)] == ["2 ulysses"] * 2
    exported, twin = load_file(shared / EXPORT_FILES["peft"]), load_file(alone / EXPORT_FILES["peft"])
    assert exported.keys() == twin.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, twin[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_a_run_terminated_mid_way_resumes_to_the_lora_of_one_process(tmp_path, alone):
    """Stopped by SIGTERM in step 1 of 3, mid-epoch (an epoch is the two training storyboards), and resumed with
    the same config but `trainer.ckpt_path=last`, so the resumed run is an uninterrupted one by construction (no
    `trainer.max_steps` change, nothing rescales; toy_long_storyboard has no curriculum). Its two steps continue
    the epoch and start the next one with the twin's storyboards and noise, and reach the twin's LoRA."""
    shared = _launch(tmp_path / "run", "--sigterm-at", "1", status=143)
    assert torch.load(shared / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not (shared / EXPORT_FILES["peft"]).exists()
    _launch(shared, "--resume")
    (record,) = [json.loads(line) for line in (shared / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["checkpoint"] == str(shared / "checkpoints" / "last.ckpt")
    assert record["changed"] == {}
    assert torch.load(shared / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    ranks = [json.loads((shared / f"batches_rank{rank}.json").read_text()) for rank in range(2)]
    twin = json.loads((alone / "batches_rank0.json").read_text())[1:]
    assert [ids for ids, _, _ in ranks[0]] == [ids for ids, _, _ in ranks[1]] == [ids for ids, _, _ in twin]
    for (_, _, loss), (_, _, loss_1), (_, _, twin_loss) in zip(*ranks, twin, strict=True):
        assert loss == loss_1 and abs(loss - twin_loss) < 1e-5
    exported, twin_lora = load_file(shared / EXPORT_FILES["peft"]), load_file(alone / EXPORT_FILES["peft"])
    assert exported.keys() == twin_lora.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, twin_lora[key], atol=1e-5, rtol=0, msg=key)


def _story(folder: Path) -> Path:
    """Two references and three shots at 48x80: 15 tokens per frame, 5 and 3 frames, never split evenly."""
    for k in (1, 2):
        Image.fromarray(np.full((40, 40, 3), 60 * k, dtype=np.uint8)).save(folder / f"role{k}.png")
    story = {
        "seed": 0,
        "height": 48,
        "width": 80,
        "references": [{"role": f"role{k}", "image": f"role{k}.png", "prompt": f"<Role {k}>"} for k in (1, 2)],
        "shots": [{"annotation": f"shot {n}: <Role 1> and <Role 2>."} for n in range(3)],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


@pytest.mark.slow
def test_torchrun_generate_draws_the_shots_of_one_process(tmp_path):
    story = _story(tmp_path)
    arguments = [str(story), "--base", "--steps", "2", "--device", "cpu", "--out"]
    assert main(["generate", *arguments, str(tmp_path / "alone")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dreamshot.cli"]
    command = [*torchrun, "generate", str(story), "inference.context_parallel.degree=2", *arguments[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(tmp_path / "shared")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for n in (1, 2, 3):
        alone = np.asarray(Image.open(tmp_path / "alone" / f"shot_{n:02d}.png"), dtype=int)
        shared = np.asarray(Image.open(tmp_path / "shared" / f"shot_{n:02d}.png"), dtype=int)
        assert np.abs(alone - shared).max() <= 1  # 8-bit rounding of values equal to float tolerance


if __name__ == "__main__":
    if "--zero2" in sys.argv:
        _train_with_zero2_on_cpu(Path(sys.argv[1]))
    elif "--ring" in sys.argv:
        _train_with_ring_on_cpu(Path(sys.argv[1]))
    elif "--sigterm-at" in sys.argv:
        _train_until_sigterm(Path(sys.argv[1]), int(sys.argv[sys.argv.index("--sigterm-at") + 1]))
    elif "--resume" in sys.argv:
        _train(Path(sys.argv[1]), "trainer.ckpt_path=last")
    else:
        _train(Path(sys.argv[1]))


@pytest.mark.slow
def test_throughput_benchmark_runs_on_a_torchrun_group():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    command = [*torchrun, "--tiny", "--device", "cpu", "--steps", "1", "--shots", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("GPU-seconds per 1k tokens") == 1 and "(context parallel 2)" in result.stdout
