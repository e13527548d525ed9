"""Atomic writes: all or nothing, ordinary permissions (the user's umask, whatever the writer); output folders
checked before a command works, creating nothing."""

import os
import shutil
import tempfile
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file

from dreamshot.utils.errors import DreamShotError
from dreamshot.utils.io import atomic_path, atomic_write_text, check_output_dir


def test_atomic_write_replaces_whole_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_writer_leaves_files_with_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "lora.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors writes its file private (0600)
        with atomic_path(tmp_path / "last.ckpt") as tmp, open(tmp, "wb") as f:
            torch.save({"w": torch.zeros(2)}, f)
        atomic_write_text(tmp_path / "index.json", "{}")
    finally:
        os.umask(previous)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_output_folder_checks_create_nothing(tmp_path, monkeypatch):
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"png")
    with pytest.raises(DreamShotError, match=r"--out .*file\.png: not a folder$"):
        check_output_dir(a_file, "--out")
    with pytest.raises(DreamShotError, match=r"--out .*file\.png/sub: not a folder \(.*file\.png is a file\)"):
        check_output_dir(a_file / "sub", "--out")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 0, 2**30))
    check_output_dir(tmp_path / "new" / "folder", "--out", need_bytes=2**29)
    with pytest.raises(DreamShotError, match=r"1.00 GiB free, the shots need about 2.00 GiB"):
        check_output_dir(tmp_path / "new", "--out", need_bytes=2**31, need_what="the shots")

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # a read-only folder (root writes anywhere)
    with pytest.raises(DreamShotError, match=r"--out .*new is not writable \(Permission denied\)"):
        check_output_dir(tmp_path / "new", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]
