"""Atomic file writes (a crash leaves either the old file or the new one, never half of one), and the check that
an output folder can take a command's files, made before the command works."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dreamshot.utils.errors import DreamShotError

TEMP_SUFFIX = ".tmp"


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
