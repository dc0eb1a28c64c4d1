"""The host tier in shared memory: one file per tensor in a folder on a tmpfs, mapped by every process.

With ``serve --workers N`` every worker process has its own weight manager. Their host tiers keep each
tensor in a file named by its content key (a hash of its sha256, dtype and shape) in one folder, such as
``/dev/shm/ptmserve-…``, so the first worker that reads a tensor from the repository fills the file and
the others map the same pages instead of reading their own copy: the processes together hold one copy.

A file's life:

```
 open(spec):  <name> exists?  yes -> map it, shared lock; its bytes are valid (filled = True)
                              no  -> create <name>.<pid>.<n>.part, size it, map it, shared lock
 the loader fills and checks the part ...
 publish(spec): link the part as <name> (unless another process published it first), unlink the part
 release(spec): never published -> unlink the part;
                published -> unlink <name> if no other process holds its lock (flock, LOCK_EX | NB)
```

Published files are complete and checked: a part is linked under its final name only after its bytes
passed their sha256 check, so a reader maps them without reading or checking anything. The locks are
``flock``\\ s, which the kernel drops when a process dies, so a killed worker never keeps a file alive;
parts left by a dead process are removed by the next ``SharedFiles`` opened on the folder.

Budgets stay per process: each weight manager counts the tensors it maps against its own host budget,
so the folder holds at most the sum of the budgets and, with affinity routing, about one copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from ptmserve import errors

logger = logging.getLogger(__name__)

_PART = re.compile(r"\.(\d+)\.\d+\.part$")


@dataclass(slots=True, eq=False)
class SharedBuffer:
    """One mapped file: what ``publish`` and ``release`` act on."""

    fd: int
    path: Path  # the final name once published, else the part
    published: bool


class SharedFiles:
    """Tensor buffers backed by files in ``folder`` (which should be on a tmpfs such as /dev/shm).

    Not thread-safe on its own: the tier that owns it calls it under the weight manager's lock.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.InvalidConfig(f"shared memory folder {str(self.folder)!r}: {exc.strerror}") from None
        self._open: set[SharedBuffer] = set()
        self._parts = itertools.count()
        self.mapped_existing = 0  # tensors found already filled by another process
        self._remove_dead_parts()

    def open(
        self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, SharedBuffer, bool]:
        """A tensor for the content ``key``, its file, and whether its bytes are already valid (another
        process filled and published them)."""
        nbytes = _numel(shape) * dtype.itemsize
        name = file_name(key)
        final = self.folder / name
        found = self._open_published(final, nbytes)
        if found is not None:
            buffer = SharedBuffer(found, final, published=True)
            self._open.add(buffer)
            self.mapped_existing += 1
            return _map(found, nbytes, shape, dtype), buffer, True
        part = self.folder / f"{name}.{os.getpid()}.{next(self._parts)}.part"
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.flock(fd, fcntl.LOCK_SH)
            tensor = _map(fd, nbytes, shape, dtype)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        buffer = SharedBuffer(fd, part, published=False)
        self._open.add(buffer)
        return tensor, buffer, False

    def publish(self, mapped: SharedBuffer) -> None:
        """``mapped``'s bytes are filled and checked: let other processes map them."""
        if mapped.published or mapped not in self._open:
            return
        final = Path(_PART.sub("", str(mapped.path)))
        with contextlib.suppress(
            FileExistsError
        ):  # published by another process meanwhile: keep ours private
            os.link(mapped.path, final)
        mapped.path.unlink(missing_ok=True)
        mapped.path, mapped.published = final, True

    def release(self, mapped: SharedBuffer) -> None:
        """This process no longer uses ``mapped``: remove its file unless another process maps it.
        (The pages stay valid for any tensor still viewing them until that tensor is freed.)"""
        if mapped not in self._open:
            return
        self._open.discard(mapped)
        try:
            if not mapped.published:
                mapped.path.unlink(missing_ok=True)
            else:
                try:
                    fcntl.flock(mapped.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                else:  # nobody else holds it: the file would only take memory
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(mapped.path).st_ino == os.fstat(mapped.fd).st_ino:
                            mapped.path.unlink()
        finally:
            os.close(mapped.fd)

    def close(self) -> None:
        """Release every buffer (as ``release`` does for each)."""
        for mapped in list(self._open):
            self.release(mapped)

    def _open_published(self, final: Path, nbytes: int) -> int | None:
        """An fd of ``final`` with a shared lock, if it exists and is still the published file."""
        for _ in range(3):
            try:
                fd = os.open(final, os.O_RDWR)
            except FileNotFoundError:
                return None
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a releasing process decides to unlink it
            try:
                same = os.stat(final).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same and os.fstat(fd).st_size == nbytes:
                return fd
            os.close(fd)  # unlinked meanwhile (or not ours): look again
        return None

    def _remove_dead_parts(self) -> None:
        """Delete parts whose writing process no longer exists (a worker killed mid-load)."""
        for path in self.folder.glob("*.part"):
            match = _PART.search(path.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or process_alive(pid):
                continue
            logger.info("removing %s, left by process %d", path.name, pid)
            path.unlink(missing_ok=True)


def file_name(key: Hashable) -> str:
    """The file name of a tensor's content key (the sha256 of its stored bytes, dtype and shape): the
    same in every process."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:40]


def _map(fd: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    mapped = mmap.mmap(fd, nbytes)  # MAP_SHARED, read and write; the tensor keeps it alive
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
