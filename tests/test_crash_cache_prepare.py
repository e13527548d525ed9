"""`dreamshot cache` and `dreamshot prepare` killed with SIGKILL in the middle of writing a file, then rerun:
the result equals an uninterrupted run's, and no file under a final name is ever half written.

The killed command is a real `python -m dreamshot.cli` process. To kill it at a known moment, its atomic
writer (`atomic_path`, in the module under test) stops once it has written half of one temporary file: the
test then sends SIGKILL, so the process dies with the temporary half written and the rename never done, which
is what a power cut in the middle of a write leaves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

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


def test_cache_killed_mid_shard_resumes_to_the_same_tensors(tmp_path):
    manifest = generate_toyworld(
        tmp_path / "toy", groups=2, seed=1, image_size=(32, 48), min_shots=2, max_shots=3, max_roles=2
    )
    straight = load_config("smoke", _cache_overrides(manifest, tmp_path / "straight"))
    assert build_cache(straight, progress=False) == 2

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
    a, b = _cached_tensors(tmp_path / "straight" / "cache"), _cached_tensors(root)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- dreamshot prepare -------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` but the report (it counts what this run did), by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != REPORT_NAME
    }


def test_prepare_killed_mid_keyframe_resumes_to_the_same_manifest(tmp_path):
    videos = tmp_path / "videos"
    render_toy_video(videos / "a.mp4", scenes=2, seed=0)
    render_toy_video(videos / "b.mp4", scenes=2, seed=1)
    cfg = load_prepare_config(overrides=toy_overrides())
    straight = prepare(videos, tmp_path / "straight", cfg, progress=False)
    assert straight.groups >= 2

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
    assert (out / MANIFEST_NAME).read_text() == (tmp_path / "straight" / MANIFEST_NAME).read_text()
    assert _files(out) == _files(tmp_path / "straight")
