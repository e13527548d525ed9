"""Atomic file writes (a crash leaves either the old file or the new one, never half of one), folders put in place
whole (`commit_folder`: a DeepSpeed checkpoint, a report), and the check that an output folder can take a command's
files, made before the command works."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dreamshot.utils.errors import DreamShotError

TEMP_SUFFIX = ".tmp"
# A folder `x` is written as `.x.partial`, and the `x` it replaces waits as `.x.old` while the new one is renamed into
# place (`commit_folder`). Hidden names that no checkpoint listing matches (`step*.ckpt`, `last*.ckpt`,
# `hpc_ckpt_*.ckpt`), and not `.tmp`: the file cleanup unlinks those.
PARTIAL_SUFFIX = ".partial"
BACKUP_SUFFIX = ".old"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates the file private (0600), and some writers (safetensors) recreate it so: the result gets
        # the permissions of an ordinary new file, the user's umask applied, once it is written.
        tmp.chmod(0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def partial_folder(path: Path) -> Path:
    """Where the folder `path` is written before it is renamed into place (`commit_folder`)."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def backup_folder(path: Path) -> Path:
    """Where the folder `path` waits while a new one is renamed into its place (`commit_folder`)."""
    return path.with_name(f".{path.name}{BACKUP_SUFFIX}")


def commit_folder(written: Path, final: Path) -> None:
    """Put the whole folder `written` in place of `final` (a file or folder, or nothing) by renames, so that at
    every moment `final` or, between the renames, its backup is whole."""
    # As `atomic_path` does for a file: on disk before its name says it is whole.
    for file in written.rglob("*"):
        if file.is_file() and not file.is_symlink():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    backup = backup_folder(final)
    if final.exists():
        remove_path(backup)  # a stale one (killed while removing it): `final` is whole
        os.rename(final, backup)
    os.rename(written, final)
    remove_path(backup)


def remove_path(path: Path) -> None:
    """Delete the file or folder `path` (nothing when there is none)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (never a file under its final name)."""
    stale = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def folder_bytes(path: str | os.PathLike) -> int:
    """The size of the files under `path` (0 for none): what a resumed command keeps instead of writing again."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check_output_dir(path: str | os.PathLike, what: str, need_bytes: int = 0, need_what: str = "its files") -> None:
    """Raise a DreamShotError naming `what` (the option or key, e.g. "--out") unless the folder `path`, which
    need not exist yet, can be created or written and its disk has `need_bytes` free for `need_what`. Creates
    nothing."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise DreamShotError(f"{what} {path}: not a folder{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DreamShotError(f"{what} {path} is not writable ({e.strerror or type(e).__name__})") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise DreamShotError(
            f"{what} {path}: {free / 2**30:.2f} GiB free, {need_what} need about {need_bytes / 2**30:.2f} GiB"
        )
