"""A training process killed with SIGKILL after a checkpoint, or interrupted with Ctrl-C (SIGINT) or SIGTERM (a
scheduler's preemption) at any moment, resumes to the same weights as a run never stopped. Ctrl-C and SIGTERM
finish the optimiser step under way, save `last.ckpt` there and end with one line (status 130, 143), so no work
since the previous checkpoint is lost."""

import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.data.datamodule import StoryboardLoader
from dreamshot.training.train import train
from dreamshot.utils.errors import Interrupted, Terminated

RUN = [
    "logger=csv",
    "data.toy.groups=4",
    "data.val_groups=1",
    "data.toy.max_shots=3",
    "data.toy.max_roles=2",
    "trainer.max_steps=8",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.val_check_interval=4",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The LoRA of the run never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return load_file(train(load_config("smoke", [*RUN, f"output_dir={out}"])) / "lora.safetensors")


def _resume_and_compare(out, straight) -> None:
    resumed = train(load_config("smoke", [*RUN, f"output_dir={out}", "trainer.ckpt_path=last"]))
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert not list((out / "checkpoints").glob(".*.tmp"))  # a killed writer's temporary is cleaned up
    b = load_file(resumed / "lora.safetensors")
    assert straight.keys() == b.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], b[key], atol=1e-6, rtol=0)


def _start(out, run=RUN):
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "dreamshot.cli", "train", "smoke", *run, f"output_dir={out}"]
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches every process of the group.
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(process, target):
    deadline = time.monotonic() + 120
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert target.exists(), "the run never wrote the checkpoint to stop after"


def test_sigkill_then_resume_matches_an_uninterrupted_run(straight, tmp_path):
    killed = tmp_path / "killed"
    process = _start(killed)
    _wait_for(process, killed / "checkpoints" / "step000002.ckpt")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "lora.safetensors").exists()  # it really died before the end
    for checkpoint in (killed / "checkpoints").glob("*.ckpt"):  # every file under a final name is whole
        torch.load(checkpoint, weights_only=True)
    _resume_and_compare(killed, straight)  # its lock is stale: the resumed run takes it over


class Signal(L.Callback):
    """Sends this process a real `signum` once, in the first backward of step `step` (0-based)."""

    def __init__(self, signum, step):
        self.signum, self.step, self.sent = signum, step, False

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(
    ("signum", "error", "said"),
    [(signal.SIGINT, Interrupted, "interrupted"), (signal.SIGTERM, Terminated, r"terminated \(SIGTERM\)")],
)
def test_a_signal_saves_the_step_under_way_then_resume_matches_an_uninterrupted_run(
    signum, error, said, straight, tmp_path
):
    out = tmp_path / "interrupted"
    handler = signal.getsignal(signum)
    with pytest.raises(error, match=rf"^{said} at step 3: saved .*last\.ckpt; continue with trainer"):
        run = load_config("smoke", [*RUN, f"output_dir={out}", "trainer.checkpoint_every_n_steps=5"])
        train(run, [Signal(signum, 2)])
    assert signal.getsignal(signum) is handler
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (out / "lora.safetensors").exists()
    _resume_and_compare(out, straight)


def test_sigterm_mid_accumulation_finishes_the_step_then_resume_matches(tmp_path):
    """Lightning's own SIGTERM handler would stop after the micro-batch under way, half a step, with no checkpoint."""
    accumulated = [*RUN, "trainer.max_steps=4", "trainer.accumulate_grad_batches=2"]
    straight = train(load_config("smoke", [*accumulated, f"output_dir={tmp_path / 'a'}"]))
    straight = load_file(straight / "lora.safetensors")
    out = tmp_path / "b"
    stopped = load_config("smoke", [*accumulated, f"output_dir={out}", "trainer.checkpoint_every_n_steps=5"])
    with pytest.raises(Terminated, match=r"^terminated \(SIGTERM\) at step 2: saved .*last\.ckpt"):
        train(stopped, [Signal(signal.SIGTERM, 1)])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = train(load_config("smoke", [*accumulated, f"output_dir={out}", "trainer.ckpt_path=last"]))
    for key, value in load_file(resumed / "lora.safetensors").items():
        torch.testing.assert_close(straight[key], value, atol=1e-6, rtol=0)


class SigtermAtStart(L.Callback):
    """Sends this process SIGTERM as training starts, while Lightning's own handler still has it."""

    def on_train_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_before_the_first_step_saves_it(tmp_path):
    run = load_config("smoke", [*RUN, "trainer.max_steps=3", f"output_dir={tmp_path}"])
    with pytest.raises(Terminated, match=r"^terminated \(SIGTERM\) at step 1: saved .*last\.ckpt; continue with"):
        train(run, [SigtermAtStart()])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_sigterm_lightning_stops_for_mid_step_names_the_last_checkpoint(tmp_path):
    """Lightning's handler ends the fit after the micro-batch under way with SystemExit (status 0 for a scheduler):
    it is one line, status 143."""
    accumulated = [*RUN, "trainer.max_steps=3", "trainer.accumulate_grad_batches=2", f"output_dir={tmp_path}"]
    with pytest.raises(Terminated, match=r"^terminated \(SIGTERM\) at step 0: earlier checkpoints intact; "):
        train(load_config("smoke", accumulated), [SigtermAtStart()])


def test_sigterm_to_the_job_saves_the_step_exits_143_and_resume_matches(straight, tmp_path):
    """As SLURM stops a job (preemption, time limit, `scancel`): SIGTERM to every process of the command, its data
    worker included."""
    out = tmp_path / "run"
    process = _start(out, [*RUN, "trainer.checkpoint_every_n_steps=2", "data.num_workers=1"])
    _wait_for(process, out / "checkpoints" / "step000002.ckpt")
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 143, err.decode()[-2000:]
    assert "Traceback" not in err.decode() and lines[-1].startswith("dreamshot train: terminated (SIGTERM) at step ")
    assert lines[-1].endswith("last.ckpt; continue with trainer.ckpt_path=last")
    step = int(lines[-1].split("step ")[1].split(":")[0])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step >= 2
    assert not (out / "run.lock").exists() and not (out / "lora.safetensors").exists()
    _resume_and_compare(out, straight)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_data_worker_outlives_the_stop_signals_the_training_process_handles(signum):
    """Ctrl-C reaches the whole foreground group and a scheduler's SIGTERM the whole job: a worker that died of it
    would fail the step the training process finishes before it saves ("worker exited unexpectedly", or at once in
    a validation pass), as the slow Ctrl-C test below did when its signal came during a validation."""
    iterator = iter(StoryboardLoader(list(range(20)), batch_size=1, num_workers=1))
    next(iterator)
    os.kill(iterator._workers[0].pid, signum)
    time.sleep(0.5)
    assert len(list(iterator)) == 19


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_ends_the_command_with_one_line(tmp_path):
    out = tmp_path / "run"
    process = _start(out, [*RUN, "trainer.max_steps=400", "data.num_workers=1"])  # the worker is signalled too
    _wait_for(process, out / "checkpoints" / "step000002.ckpt")
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    line = err.decode().splitlines()[-1]
    assert line.startswith("dreamshot train: interrupted at step ") and "continue with trainer.ckpt_path=last" in line
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
    step = int(line.split("step ")[1].split(":")[0])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step >= 2
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_sigterm_to_rank_0_of_two_stops_both_at_one_step(tmp_path):
    """Two gloo processes (Lightning starts rank 1): a SIGTERM to rank 0 alone stops both at the same step."""
    out = tmp_path / "run"
    process = _start(out, [*RUN, "trainer=ddp_cpu", "data.toy.groups=6", "trainer.max_steps=400"])
    _wait_for(process, out / "checkpoints" / "step000002.ckpt")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    # Each rank says it; their lines may interleave on the one stderr.
    steps = re.findall(r"dreamshot train: terminated \(SIGTERM\) at step (\d+): saved ", err.decode())
    assert process.returncode == 143 and len(steps) == 2 and steps[0] == steps[1], err.decode()[-2000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == int(steps[0]) >= 2
