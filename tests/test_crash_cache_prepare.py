"""`dreamshot cache` and `dreamshot prepare` killed with SIGKILL, or interrupted with Ctrl-C (SIGINT), in the
middle of writing a file, then rerun: the result equals an uninterrupted run's, and no file under a final name
is ever half written. A Ctrl-C ends the command with one line and status 130.

The killed command is a real `python -m dreamshot.cli` process. To kill it at a known moment, its atomic
writer (`atomic_path`, in the module under test) stops once it has written half of one temporary file: the
test then sends SIGKILL, so the process dies with the temporary half written and the rename never done, which
is what a power cut in the middle of a write leaves. The interrupted command runs in this process, which sends
itself SIGINT at the same moment.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamshot.cli import main
from dreamshot.commands.cache import build_cache
from dreamshot.config.load import load_config
from dreamshot.data.cache import INDEX_NAME
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.pipeline import MANIFEST_NAME, prepare
from dreamshot.prepare.report import REPORT_NAME
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.utils.io import TEMP_SUFFIX

# Runs the CLI with `<module>.atomic_path` replaced: the first write to a path containing PART is left half
# written under its temporary name, and the process waits there to be killed (after touching MARKER).
STALLING_CLI = """
import contextlib, importlib, sys, time
from pathlib import Path
module_name, part, marker, *argv = sys.argv[1:]
module = importlib.import_module(module_name)
real = module.atomic_path

@contextlib.contextmanager
def stalling(path):
    with real(path) as tmp:
        yield tmp
        if part in str(path):
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            Path(marker).touch()
            time.sleep(600)

module.atomic_path = stalling
from dreamshot.cli import main
sys.exit(main(argv))
"""


def _kill_while_writing(module: str, part: str, argv: list[str], tmp_path: Path) -> None:
    """Run `dreamshot ARGV`, SIGKILL it while it writes the first file whose path contains `part`."""
    marker = tmp_path / "stalled"
    command = [sys.executable, "-c", STALLING_CLI, module, part, str(marker), *argv]
    env = {**os.environ, "WANDB_MODE": "offline"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert marker.exists(), f"the command never wrote {part}: {err.decode()[-2000:]}"


def _temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(f".*{TEMP_SUFFIX}"))


# --- dreamshot cache ---------------------------------------------------------------------------------------


def _cache_overrides(manifest: Path, folder: Path) -> list[str]:
    return [
        "logger=csv",
        f"data.manifest={manifest}",
        "data.resolution=[32,48]",
        "data.max_shots=2",
        "data.val_groups=1",
        "data.cache_shard_size=1",
        f"data.cache_dir={folder / 'cache'}",
        f"output_dir={folder / 'run'}",
    ]


def _cached_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard the index lists, by key (record id / name)."""
    index = json.loads((root / INDEX_NAME).read_text())
    tensors = {}
    for shards in index["resolutions"].values():
        for shard in shards:
            tensors.update(load_file(root / shard["file"]))
    return tensors


def _interrupt_while_writing(monkeypatch, module: str, part: str, argv: list[str], capfd) -> str:
    """Run `dreamshot ARGV` here; a real SIGINT arrives while it writes the first file whose path contains
    `part`. Returns the one line it printed on stderr (it must exit with status 130)."""
    target = importlib.import_module(module)
    real = target.atomic_path

    @contextlib.contextmanager
    def interrupted(path):
        with real(path) as tmp:
            yield tmp
            if part in str(path):
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)  # KeyboardInterrupt is raised here

    monkeypatch.setattr(target, "atomic_path", interrupted)
    # A process started as a script's background job inherits SIGINT ignored; a terminal's Ctrl-C is what is tested.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    capfd.readouterr()
    try:
        assert main(argv) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def cache_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A toy manifest of 2 groups and the cache an uninterrupted `dreamshot cache` builds of it (1 per shard)."""
    tmp = tmp_path_factory.mktemp("cache")
    manifest = generate_toyworld(
        tmp / "toy", groups=2, seed=1, image_size=(32, 48), min_shots=2, max_shots=3, max_roles=2
    )
    straight = load_config("smoke", _cache_overrides(manifest, tmp / "straight"))
    assert build_cache(straight, progress=False) == 2
    return manifest, tmp / "straight" / "cache"


def _assert_same_cache(root: Path, straight: Path) -> None:
    a, b = _cached_tensors(straight), _cached_tensors(root)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cache_interrupted_mid_shard_says_so_and_resumes_to_the_same_tensors(
    cache_inputs, tmp_path, monkeypatch, capfd
):
    manifest, straight = cache_inputs
    argv = ["cache", "smoke", *_cache_overrides(manifest, tmp_path), "--device", "cpu", "--no-progress"]
    line = _interrupt_while_writing(monkeypatch, "dreamshot.data.cache", "shard-00001", argv, capfd)
    assert line == "dreamshot cache: interrupted; finished work is kept, rerun to continue"
    root = tmp_path / "cache"
    assert [s["file"] for s in json.loads((root / INDEX_NAME).read_text())["resolutions"]["32x48"]] == [
        "32x48/shard-00000.safetensors"
    ]
    assert not _temporaries(root)  # the interrupted writer removed its temporary
    assert build_cache(load_config("smoke", _cache_overrides(manifest, tmp_path)), progress=False) == 1
    _assert_same_cache(root, straight)


def test_a_damaged_shard_is_encoded_again_without_clobbering_the_others(cache_inputs, tmp_path):
    manifest, straight = cache_inputs
    root = tmp_path / "cache"
    shutil.copytree(straight, root)
    first, second = root / "32x48" / "shard-00000.safetensors", root / "32x48" / "shard-00001.safetensors"
    kept = second.read_bytes()
    first.write_bytes(first.read_bytes()[:100])  # truncated, as a partial copy leaves it
    assert build_cache(load_config("smoke", _cache_overrides(manifest, tmp_path)), progress=False) == 1
    assert second.read_bytes() == kept and not first.exists()
    assert [s["file"] for s in json.loads((root / INDEX_NAME).read_text())["resolutions"]["32x48"]] == [
        "32x48/shard-00001.safetensors",
        "32x48/shard-00002.safetensors",
    ]
    _assert_same_cache(root, straight)


def test_cache_killed_mid_shard_resumes_to_the_same_tensors(cache_inputs, tmp_path):
    manifest, straight = cache_inputs
    killed = tmp_path / "killed"
    argv = ["cache", "smoke", *_cache_overrides(manifest, killed), "--device", "cpu", "--no-progress"]
    _kill_while_writing("dreamshot.data.cache", "shard-00001", argv, tmp_path)
    root = killed / "cache"
    index = json.loads((root / INDEX_NAME).read_text())
    # The first shard is complete and listed; the second died half written under its temporary name.
    assert [s["file"] for s in index["resolutions"]["32x48"]] == ["32x48/shard-00000.safetensors"]
    assert sorted(p.name for p in (root / "32x48").glob("*.safetensors")) == ["shard-00000.safetensors"]
    assert [p.name.split(".")[1] for p in _temporaries(root)] == ["shard-00001"]
    _cached_tensors(root)  # every listed shard reads whole

    resumed = load_config("smoke", _cache_overrides(manifest, killed))
    assert build_cache(resumed, progress=False) == 1  # only the group no complete shard held
    assert not _temporaries(root)
    _assert_same_cache(root, straight)


# --- dreamshot prepare -------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` but the report (it counts what this run did), by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != REPORT_NAME
    }


@pytest.fixture(scope="module")
def prepare_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Two toy videos and the output folder of an uninterrupted `dreamshot prepare` of them."""
    tmp = tmp_path_factory.mktemp("prepare")
    videos = tmp / "videos"
    render_toy_video(videos / "a.mp4", scenes=2, seed=0)
    render_toy_video(videos / "b.mp4", scenes=2, seed=1)
    straight = prepare(videos, tmp / "straight", load_prepare_config(overrides=toy_overrides()), progress=False)
    assert straight.groups >= 2
    return videos, tmp / "straight"


def test_prepare_interrupted_mid_keyframe_says_so_and_resumes_to_the_same_manifest(
    prepare_inputs, tmp_path, monkeypatch, capfd
):
    videos, straight = prepare_inputs
    out = tmp_path / "interrupted"
    argv = ["prepare", str(videos), *toy_overrides(), "--out", str(out), "--no-progress"]
    line = _interrupt_while_writing(monkeypatch, "dreamshot.prepare.files", "frames/b/", argv, capfd)
    assert line == "dreamshot prepare: interrupted; finished work is kept, rerun to continue"
    assert (out / "state" / "a" / "keyframes.json").is_file() and not _temporaries(out)
    resumed = prepare(videos, out, load_prepare_config(overrides=toy_overrides()), progress=False)
    assert [c.done for c in resumed.counts] == [0, 0, 1, 2, 2, 2]  # only b's keyframes and the later stages
    assert _files(out) == _files(straight)


def test_prepare_killed_mid_keyframe_resumes_to_the_same_manifest(prepare_inputs, tmp_path):
    videos, straight = prepare_inputs
    cfg = load_prepare_config(overrides=toy_overrides())
    out = tmp_path / "killed"
    argv = ["prepare", str(videos), *toy_overrides(), "--out", str(out), "--no-progress"]
    # Killed while writing video b's first keyframe: video a's keyframes stage is done.
    _kill_while_writing("dreamshot.prepare.files", "frames/b/", argv, tmp_path)
    assert not (out / MANIFEST_NAME).exists()
    assert (out / "state" / "a" / "keyframes.json").is_file() and not (out / "state" / "b" / "keyframes.json").exists()
    assert [p.parent.name for p in _temporaries(out)] == ["b"] and not list((out / "frames" / "b").glob("*.png"))
    for path in out.rglob("*.png"):  # every file under a final name is whole
        with Image.open(path) as image:
            image.load()
    for path in out.rglob("*.json"):
        json.loads(path.read_text())

    resumed = prepare(videos, out, cfg, progress=False)
    assert [c.done for c in resumed.counts] == [0, 0, 1, 2, 2, 2]  # only b's keyframes and the later stages
    assert not _temporaries(out)
    assert (out / MANIFEST_NAME).read_text() == (straight / MANIFEST_NAME).read_text()
    assert _files(out) == _files(straight)
