"""The bad-input corpus (tests/faults/cases.yaml) through the public CLI, tested as the promise is written: exit
status 2, exactly one non-empty line on stderr (nothing printed before it: no banner, no warning), no traceback,
and every folder the case touches byte-identical afterwards (its inputs, the run folder it was given, and no
output folder created)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.training.run_folder import LOCK_FILE
from dreamshot.training.train import train

FAULTS = Path(__file__).parent / "faults"
CASES = yaml.safe_load((FAULTS / "cases.yaml").read_text())["cases"]
# The finished run some cases start from: the smallest run of the tiny Wan that writes every file of a run.
RUN = [
    "logger=csv",
    "data.toy.groups=3",
    "data.val_groups=1",
    "data.toy.max_shots=2",
    "data.toy.max_roles=1",
    "trainer.max_steps=2",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.val_check_interval=1",
]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    train(load_config("smoke", [*RUN, f"output_dir={out}"]))
    return out


def _copy_run(run: Path, given: Path) -> Path:
    shutil.copytree(run, given)
    return given / "checkpoints" / "last.ckpt"


def _cosine_run(run: Path, given: Path) -> None:
    """A finished run like RUN whose learning rate decays on a cosine (trained afresh: only it needs one)."""
    train(load_config("smoke", [*RUN, "optim.schedule=cosine", f"output_dir={given}"]))


def _truncated_checkpoint(run: Path, given: Path) -> None:
    last = _copy_run(run, given)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


def _nan_checkpoint(run: Path, given: Path) -> None:
    last = _copy_run(run, given)
    checkpoint = torch.load(last, weights_only=True)
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first] = torch.full_like(checkpoint["state_dict"][first], float("nan"))
    torch.save(checkpoint, last)


def _run_in_use(run: Path, given: Path) -> None:
    """The run folder, locked by a live process (this one) as a concurrent run would hold it."""
    _copy_run(run, given)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (given / LOCK_FILE).write_text(json.dumps(owner))


def _nan_lora(run: Path, given: Path) -> None:
    given.mkdir()
    state = load_file(run / "lora.safetensors")
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("inf"))
    save_file(state, given / "nan.safetensors")


# `given: NAME` in a case: what {given} holds when the case starts (a folder of the corpus is copied as it is).
GIVEN = {
    "run": _copy_run,
    "cosine_run": _cosine_run,
    "run_truncated_checkpoint": _truncated_checkpoint,
    "run_nan_checkpoint": _nan_checkpoint,
    "run_in_use": _run_in_use,
    "nan_lora": _nan_lora,
}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under `roots`, by path: what "byte-identical" compares."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def test_corpus_is_large_enough():
    assert len(CASES) >= 110 and len({case["name"] for case in CASES}) == len(CASES)
    assert set(GIVEN) <= {case.get("given") for case in CASES}  # every builder serves a case


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capfd, monkeypatch, request):
    if case.get("needs") == "no_cuda" and torch.cuda.is_available():
        pytest.skip("the case is a machine without CUDA")
    out, given = tmp_path / "out", tmp_path / "given"
    if "given" in case:
        build = GIVEN.get(case["given"])
        if build is None:
            shutil.copytree(FAULTS / case["given"], given)
        else:
            build(request.getfixturevalue("finished_run"), given)
    place = {"faults": FAULTS, "out": out, "given": given}
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value.format(**place))
    if "disk_free" in case:  # every disk as full as the case says
        usage = shutil.disk_usage(tmp_path)._replace(free=case["disk_free"])
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    words = [w for arg in case["argv"] for w in (arg if isinstance(arg, list) else [arg])]  # yaml aliases nest
    argv = [word.format(**place) for word in words]
    before = _snapshot(tmp_path, FAULTS)
    capfd.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capfd.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"dreamshot {argv[0]}: error: "), line
    for expected in case["expect"]:
        assert expected in line, f"{expected!r} not in {line!r}"
    for secret in case.get("absent", []):
        assert secret not in line, f"{secret!r} repeated in {line!r}"
    assert _snapshot(tmp_path, FAULTS) == before, "the case changed a file or folder"
