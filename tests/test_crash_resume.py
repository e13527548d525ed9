"""A training process killed with SIGKILL after a checkpoint resumes to the same weights as a run never killed."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.training.train import train

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


def _kill_after_checkpoint(out, step):
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "dreamshot.cli", "train", "smoke", *RUN, f"output_dir={out}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / f"step{step:06d}.ckpt"
    deadline = time.monotonic() + 120
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "the run never wrote the checkpoint to kill after"


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = train(load_config("smoke", [*RUN, f"output_dir={tmp_path / 'straight'}"]))
    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, step=2)
    assert not (killed / "lora.safetensors").exists()  # it really died before the end
    for checkpoint in (killed / "checkpoints").glob("*.ckpt"):  # every file under a final name is whole
        torch.load(checkpoint, weights_only=True)
    resumed = train(
        load_config(
            "smoke", [*RUN, f"output_dir={killed}", f"trainer.ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"]
        )
    )
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # a killed writer's temporary is cleaned up
    a, b = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
