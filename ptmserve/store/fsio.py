"""Small durable-file helpers for the repository: temp files, fsync, atomic renames, the repo lock.

Every file the repository publishes is first written in full under ``tmp/``, fsynced, then renamed
into place with :func:`rename_durable` (rename plus an fsync of the target folder). A process
killed at any point therefore leaves either the old file, the new file, or a stray temp file that
``Repository.gc()`` removes; never a half-written published file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class RepoPaths:
    """The folders and files of a repository rooted at ``root``."""

    root: Path

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def segments(self) -> Path:
        return self.root / "segments"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    def manifest(self, name: str) -> Path:
        return self.manifests / f"{name}{MANIFEST_SUFFIX}"

    def create(self) -> None:
        for d in (self.manifests, self.segments, self.tmp):
            d.mkdir(parents=True, exist_ok=True)


# Largest single write; bigger buffers are written in slices so a slow disk still shows progress.
_WRITE_SLICE = 64 << 20


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(tmp_dir: Path, chunks: Iterable[memoryview | bytes], suffix: str = ".tmp") -> Path:
    """Write ``chunks`` back to back into a new file under ``tmp_dir`` and fsync it.

    Args:
        tmp_dir: folder for the temp file; must be on the same file system as its final place.
        chunks: byte buffers, written in order.
        suffix: file name suffix, for humans looking at a stray temp file.

    Returns:
        The path of the complete, fsynced temp file.

    Raises:
        OSError: the file could not be written (the partial temp file is removed).
    """
    path = tmp_dir / f"{uuid.uuid4().hex}{suffix}"
    try:
        with open(path, "wb", buffering=0) as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                for start in range(0, len(view), _WRITE_SLICE):
                    _write_all(f.fileno(), view[start : start + _WRITE_SLICE])
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return path


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def rename_durable(src: Path, dst: Path) -> None:
    """Atomically move file ``src`` to ``dst`` (replacing it) and fsync ``dst``'s folder."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the ``with`` block.

    Writers (imports, removals, gc) of one repository serialise on this lock, across threads and
    processes; the kernel drops it when a holder dies. Readers never take it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
