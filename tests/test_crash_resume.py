"""A training process killed with SIGKILL after a checkpoint, or interrupted with Ctrl-C (SIGINT) at any moment,
resumes to the same weights as a run never stopped. Ctrl-C finishes the optimiser step under way, saves
`last.ckpt` there and ends with one line (status 130), so no work since the previous checkpoint is lost."""

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.training.train import train
from dreamshot.utils.errors import Interrupted

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


class CtrlC(L.Callback):
    """Sends this process a real SIGINT while step `step` is under way."""

    def __init__(self, step):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_the_step_under_way_then_resume_matches_an_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted, match=r"^interrupted at step 3: saved .*last\.ckpt; continue with trainer"):
        train(load_config("smoke", [*RUN, f"output_dir={out}", "trainer.checkpoint_every_n_steps=5"]), [CtrlC(2)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (out / "lora.safetensors").exists()
    _resume_and_compare(out, straight)


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
