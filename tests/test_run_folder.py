"""One run per output folder: the lock held for the run's life (stale locks taken over), a fresh run refused in
a folder holding another run unless told to start over, `trainer.ckpt_path=last`, and which config changes a
resumed run may make (curriculum phases included)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch

from dreamshot.config.load import load_config
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.training.resume import config_changes
from dreamshot.training.run_folder import LOCK_FILE, RESUME_LOG, RunLock
from dreamshot.training.train import train
from dreamshot.utils.errors import ConfigError, DreamShotError

FAST = ["logger=csv", "data.toy.groups=3", "data.val_groups=1", "data.toy.max_shots=2", "data.toy.max_roles=1"]


def _config(out, *overrides):
    return load_config("smoke", [*FAST, f"output_dir={out}", "trainer.val_check_interval=1", *overrides])


def _write_lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(owner))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_run_holds_the_folder(tmp_path):
    _write_lock(tmp_path, os.getpid())
    with pytest.raises(DreamShotError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path).check()
    with pytest.raises(DreamShotError, match="in use by another run"), RunLock(tmp_path):
        pass
    _write_lock(tmp_path, _dead_pid(), host="another-node")  # a process elsewhere cannot be checked
    with pytest.raises(DreamShotError, match=r"on another-node .* delete .*run\.lock"):
        RunLock(tmp_path).check()


@pytest.mark.parametrize("left", ["dead process", "half written"])
def test_a_stale_lock_is_taken_over_and_released(tmp_path, left):
    if left == "dead process":
        _write_lock(tmp_path, _dead_pid())
    else:
        (tmp_path / LOCK_FILE).write_text('{"pid": ')
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_last_starts_a_fresh_run_holding_the_lock_then_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    seen = []

    class Lock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(json.loads((out / LOCK_FILE).read_text())["pid"])

    train(_config(out, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "trainer.ckpt_path=last"), [Lock()])
    assert seen == [os.getpid()] and not (out / LOCK_FILE).exists() and not (out / RESUME_LOG).exists()
    with pytest.raises(DreamShotError, match="holds another run"):
        train(_config(out, "trainer.max_steps=1"))
    train(_config(out, "trainer.max_steps=1", "trainer.overwrite=true"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # the old run's are gone
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_lightnings_slurm_requeue_checkpoint_is_the_runs_not_a_silent_resume(tmp_path):
    """Under SLURM, Lightning saves `hpc_ckpt_N.ckpt` into the folder on SIGUSR1 and would resume the newest, unchecked,
    for a job started without a checkpoint path: the run folder counts them as its checkpoints instead."""
    out = tmp_path / "run"
    train(_config(out, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1"))
    checkpoints = out / "checkpoints"
    (checkpoints / "step000001.ckpt").rename(out / "hpc_ckpt_9.ckpt")
    (checkpoints / "last.ckpt").rename(out / "hpc_ckpt_10.ckpt")
    shutil.rmtree(checkpoints)
    with pytest.raises(DreamShotError, match=r"holds another run \(hpc_ckpt_9\.ckpt, hpc_ckpt_10\.ckpt, lora"):
        train(_config(out, "trainer.max_steps=3"))
    train(_config(out, "trainer.max_steps=3", "trainer.ckpt_path=last", "trainer.checkpoint_every_n_steps=1"))
    (resumed,) = [json.loads(line) for line in (out / RESUME_LOG).read_text().splitlines()]
    assert (resumed["checkpoint"], resumed["step"]) == (str(out / "hpc_ckpt_10.ckpt"), 2)  # the newest, not by name
    train(_config(out, "trainer.max_steps=1", "trainer.overwrite=true"))
    assert not list(out.glob("hpc_ckpt_*"))


def test_a_checkpoint_of_another_folder_is_not_resumed_into_a_third_run(tmp_path):
    first = train(_config(tmp_path / "a", "trainer.max_steps=1"))
    train(_config(tmp_path / "b", "trainer.max_steps=1"))
    with pytest.raises(DreamShotError, match=r"output_dir .*b holds another run"):
        train(_config(tmp_path / "b", "trainer.max_steps=2", f"trainer.ckpt_path={first / 'checkpoints/last.ckpt'}"))


PHASES = [{"steps": 4, "resolution": [64, 112], "use_racl": True}, {"steps": 4, "resolution": [80, 128]}]


def _with(phases, i, **change):
    return [({**phase, **change} if n == i else phase) for n, phase in enumerate(phases)]


@pytest.mark.parametrize(
    ("step", "now", "refused"),
    [
        (2, _with(PHASES, 1, resolution=[96, 160], steps=9), []),  # a phase not started may change
        (2, _with(PHASES, 0, steps=6), []),  # the current phase may grow
        (2, _with(PHASES, 0, steps=2), []),  # or end now
        (3, _with(PHASES, 0, steps=2), ["curriculum[0].steps"]),  # not before the steps it has done
        (2, _with(PHASES, 0, resolution=[96, 160]), ["curriculum[0].resolution"]),
        (6, _with(PHASES, 0, steps=5), ["curriculum[0].steps"]),  # a finished phase is history
        # So is one the checkpoint ends: the resumed run goes on with the next phase (the next epoch).
        (4, _with(PHASES, 0, steps=6), ["curriculum[0].steps"]),
        (4, _with(PHASES, 1, steps=6), []),
        (8, _with(PHASES, 1, steps=6), ["curriculum[1].steps"]),  # the last one too
        (6, _with(PHASES, 1, steps=3), []),
        (6, PHASES[:1], ["curriculum[1]"]),
        (3, [], ["curriculum"]),
        (0, [], []),  # nothing trained yet
    ],
)
def test_curriculum_changes_after_the_resumed_step_are_free(step, now, refused):
    assert sorted(config_changes({"curriculum": PHASES}, {"curriculum": now}, step)) == refused


def test_changes_are_compared_key_by_key_ignoring_keys_of_another_schema_version():
    changes = config_changes(
        {"optim": {"lr": 1e-4}, "trainer": {"max_steps": 4, "devices": 1}, "logger": {"project": "a"}, "old_key": 1},
        {"optim": {"lr": 1e-3}, "trainer": {"max_steps": 8, "devices": 2}, "logger": {"project": "b"}, "new_key": 2},
        step=2,
    )
    assert changes == {
        "logger.project": ("a", "b"),
        "optim.lr": (1e-4, 1e-3),
        "trainer.devices": (1, 2),
        "trainer.max_steps": (4, 8),
    }


def test_a_manifest_edited_since_the_checkpoint_is_refused_naming_it(tmp_path):
    """Same path, other lines: the resumed run would train on other storyboards, in another order."""
    manifest = generate_toyworld(tmp_path / "data", 3, 0, (32, 48), 2, 2, 1)
    run = ["logger=csv", f"data.manifest={manifest}", "data.val_groups=1", f"output_dir={tmp_path / 'run'}"]
    train(load_config("smoke", [*run, "trainer.max_steps=1"]))
    resumed = load_config("smoke", [*run, "trainer.max_steps=2", "trainer.ckpt_path=last"])
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join([lines[1], lines[0], *lines[2:]]))  # the training groups swapped
    with pytest.raises(ConfigError, match=r"data.manifest=.*manifest.jsonl changed since the checkpoint") as err:
        train(resumed)
    assert err.value.key == "data.manifest"
    manifest.write_text("".join(lines))
    train(resumed)  # the manifest it was trained on
