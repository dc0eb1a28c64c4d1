"""Segment files: immutable, content-addressed files of tensor bytes laid back to back.

A segment holds the new tensors of one layer group of one import, each at an offset aligned to
``ALIGN`` bytes (zero padding between). Its id is the sha256 of its table of contents (each
tensor's offset, length and sha256), so the id fixes the content. Reads coalesce entries that sit
close together in one segment into one ``preadv`` and check every tensor against its sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ptmserve import errors
from ptmserve.store import fsio
from ptmserve.store.manifest import TensorEntry, tensor_group, torch_dtype

logger = logging.getLogger(__name__)

ALIGN = 64  # byte alignment of every tensor in a segment (and of each run in a read buffer)
SEGMENT_SUFFIX = ".seg"
_IOV_MAX = 1024
# Entries closer than this are read in one request (the gap bytes are read and dropped).
_READ_GAP = 64 << 10
_SCATTER_GAP = 4 << 10
_HASH_CHUNK = 8 << 20
_ZEROS = bytes(ALIGN)


class Located(Protocol):
    """Anything stored in a segment: a TensorEntry or a BlobRef."""

    @property
    def segment(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_path(seg_dir: Path, segment: str) -> Path:
    return seg_dir / f"{segment}{SEGMENT_SUFFIX}"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (copied only when ``t`` is not a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def sha256_hex(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class SegmentBuilder:
    """The new tensors of one segment, laid out but not yet written."""

    parts: list[tuple[int, memoryview]] = field(default_factory=list)  # (offset, bytes)
    toc: list[str] = field(default_factory=list)
    size: int = 0

    def add(self, data: memoryview, sha: str) -> int:
        """Place ``data`` (whose sha256 is ``sha``) at the next aligned offset; return the offset."""
        offset = align_up(self.size)
        self.parts.append((offset, data))
        self.toc.append(f"{offset} {len(data)} {sha}\n")
        self.size = offset + len(data)
        return offset

    @property
    def segment_id(self) -> str:
        return sha256_hex(("ptmserve-segment-1\n" + "".join(self.toc)).encode())

    def chunks(self) -> Iterator[memoryview | bytes]:
        pos = 0
        for offset, data in self.parts:
            if offset > pos:
                yield _ZEROS[: offset - pos]
            yield data
            pos = offset + len(data)


def publish(seg_dir: Path, tmp_dir: Path, segment: str, chunks: Iterator[memoryview | bytes]) -> Path:
    """Write a segment via a fsynced temp file and rename it to its content-addressed name."""
    tmp = fsio.write_temp(tmp_dir, chunks, suffix=SEGMENT_SUFFIX + ".tmp")
    dst = segment_path(seg_dir, segment)
    fsio.rename_durable(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------- reads


@dataclass(slots=True)
class _Run:
    """Entries of one segment read with one request: bytes [start, end) of the file."""

    segment: str
    start: int
    end: int
    entries: list[TensorEntry]


def _plan_runs(entries: Sequence[TensorEntry], max_gap: int, allow_overlap: bool) -> list[_Run]:
    runs: list[_Run] = []
    for e in sorted(entries, key=lambda e: (e.segment, e.offset, e.nbytes)):
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.segment == e.segment
            and e.offset - last.end <= max_gap
            and (allow_overlap or e.offset >= last.end)
        ):
            last.entries.append(e)
            last.end = max(last.end, e.end)
        else:
            runs.append(_Run(e.segment, e.offset, e.end, [e]))
    return runs


def _corrupt(model: str, e: TensorEntry, what: str, path: Path) -> errors.CorruptData:
    # Name the segment relative to the repository: messages reach clients, server paths must not.
    return errors.CorruptData(
        f"model {model!r} group {tensor_group(e.name)!r} tensor {e.name!r}: {what} (segments/{path.name})"
    )


def _open_checked(path: Path, run: _Run, model: str) -> int:
    """Open a segment for reading, raising CorruptData if it is missing or too short for ``run``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _corrupt(model, run.entries[0], "segment file is missing", path) from None
    size = os.fstat(fd).st_size
    if size < run.end:
        os.close(fd)
        short = next(e for e in run.entries if e.end > size)
        raise _corrupt(model, short, f"segment file is truncated ({size} bytes, needs {run.end})", path)
    return fd


def pread_exact(fd: int, buffers: Sequence[memoryview], offset: int) -> bool:
    """Fill ``buffers`` in order from the file bytes starting at ``offset``; False on early EOF."""
    views = [b for b in buffers if len(b)]
    i = 0
    while i < len(views):
        n = os.preadv(fd, views[i : i + _IOV_MAX], offset)
        if n == 0:
            return False
        offset += n
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return True


def read_tensors(
    seg_dir: Path, entries: Sequence[TensorEntry], *, verify: bool, model: str
) -> dict[str, torch.Tensor]:
    """Read ``entries`` into new CPU tensors: one buffer, one request per run, tensors are views.

    Tensors whose bytes are identical (tied weights) may share storage.

    Raises:
        errors.CorruptData: a segment is missing or truncated, or (with ``verify``) a checksum fails.
    """
    runs = _plan_runs(entries, _READ_GAP, allow_overlap=True)
    buf = torch.empty(sum(align_up(r.end - r.start) for r in runs), dtype=torch.uint8)
    arr = buf.numpy()
    out: dict[str, torch.Tensor] = {}
    base = 0
    for run in runs:
        path = segment_path(seg_dir, run.segment)
        fd = _open_checked(path, run, model)
        try:
            ok = pread_exact(fd, [memoryview(arr[base : base + run.end - run.start])], run.start)
        finally:
            os.close(fd)
        if not ok:  # shrank after the size check
            raise _corrupt(model, run.entries[-1], "segment file is truncated", path)
        for e in run.entries:
            lo = base + e.offset - run.start
            if verify and sha256_hex(arr[lo : lo + e.nbytes]) != e.sha256:
                raise _corrupt(model, e, "checksum mismatch", path)
            out[e.name] = buf[lo : lo + e.nbytes].view(torch_dtype(e.dtype)).view(e.shape)
        base += align_up(run.end - run.start)
    return out


def _dst_bytes(e: TensorEntry, out: dict[str, torch.Tensor]) -> memoryview:
    try:
        dst = out[e.name]
    except KeyError:
        raise errors.InvalidInput(f"no output tensor for {e.name!r}") from None
    nbytes = dst.numel() * dst.element_size()
    if dst.device.type != "cpu" or not dst.is_contiguous() or nbytes != e.nbytes:
        raise errors.InvalidInput(
            f"output tensor for {e.name!r} must be a contiguous CPU tensor of {e.nbytes} bytes, got "
            f"{dst.device} {tuple(dst.shape)} {dst.dtype} contiguous={dst.is_contiguous()}"
        )
    if nbytes == 0:
        return memoryview(b"")
    return memoryview(dst.reshape(-1).view(torch.uint8).numpy())


def read_into(
    seg_dir: Path,
    entries: Sequence[TensorEntry],
    out: dict[str, torch.Tensor],
    *,
    verify: bool,
    model: str,
) -> None:
    """Read each entry's bytes straight into ``out[entry.name]`` (scatter reads, no staging copy).

    Raises:
        errors.InvalidInput: an output tensor is missing, not contiguous on CPU, or of another size.
        errors.CorruptData: a segment is missing or truncated, or (with ``verify``) a checksum fails.
    """
    dsts = {e.name: _dst_bytes(e, out) for e in entries}
    for run in _plan_runs(entries, _SCATTER_GAP, allow_overlap=False):
        path = segment_path(seg_dir, run.segment)
        buffers: list[memoryview] = []
        pos = run.start
        for e in run.entries:
            if e.offset > pos:
                buffers.append(memoryview(bytearray(e.offset - pos)))
            buffers.append(dsts[e.name])
            pos = e.end
        fd = _open_checked(path, run, model)
        try:
            ok = pread_exact(fd, buffers, run.start)
        finally:
            os.close(fd)
        if not ok:
            raise _corrupt(model, run.entries[-1], "segment file is truncated", path)
        if verify:
            for e in run.entries:
                if sha256_hex(dsts[e.name]) != e.sha256:
                    raise _corrupt(model, e, "checksum mismatch", path)


def hash_stored(path: Path, offset: int, nbytes: int, scratch: bytearray | None = None) -> str | None:
    """sha256 of ``nbytes`` at ``offset`` of ``path``, read in chunks; None if missing or too short."""
    scratch = scratch if scratch is not None else bytearray(min(nbytes, _HASH_CHUNK) or 1)
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < offset + nbytes:
            return None
        view = memoryview(scratch)
        done = 0
        while done < nbytes:
            chunk = view[: min(len(view), nbytes - done)]
            if not pread_exact(fd, [chunk], offset + done):
                return None
            h.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def check_stored(seg_dir: Path, refs: Sequence[Located]) -> dict[Located, tuple[str, str]]:
    """Re-hash stored byte ranges; return ``{ref: (kind, detail)}`` for every ref not intact.

    ``kind`` is "missing", "truncated" or "checksum". Each distinct (segment, offset, nbytes,
    sha256) is read once, in file order.
    """
    problems: dict[Located, tuple[str, str]] = {}
    scratch = bytearray(_HASH_CHUNK)
    results: dict[tuple[str, int, int, str], str | None] = {}
    sizes: dict[str, int | None] = {}
    for ref in sorted(refs, key=lambda r: (r.segment, r.offset)):
        path = segment_path(seg_dir, ref.segment)
        if ref.segment not in sizes:
            sizes[ref.segment] = path.stat().st_size if path.exists() else None
        size = sizes[ref.segment]
        if size is None:
            problems[ref] = ("missing", "segment file is missing")
        elif size < ref.offset + ref.nbytes:
            end = ref.offset + ref.nbytes
            problems[ref] = ("truncated", f"segment file is truncated ({size} bytes, needs {end})")
        else:
            key = (ref.segment, ref.offset, ref.nbytes, ref.sha256)
            if key not in results:
                results[key] = hash_stored(path, ref.offset, ref.nbytes, scratch)
            if results[key] != ref.sha256:
                problems[ref] = ("checksum", "checksum mismatch")
    return problems


def read_blob(seg_dir: Path, ref: Located, what: str) -> bytes:
    """Read and check the bytes of ``ref`` (e.g. a tokenizer); ``what`` names it in errors.

    Raises:
        errors.CorruptData: the segment is missing or truncated, or the checksum fails.
    """
    path = segment_path(seg_dir, ref.segment)
    buf = bytearray(ref.nbytes)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise errors.CorruptData(f"{what}: segment file is missing (segments/{path.name})") from None
    try:
        ok = pread_exact(fd, [memoryview(buf)], ref.offset)
    finally:
        os.close(fd)
    if not ok:
        raise errors.CorruptData(f"{what}: segment file is truncated (segments/{path.name})")
    if sha256_hex(buf) != ref.sha256:
        raise errors.CorruptData(f"{what}: checksum mismatch (segments/{path.name})")
    return bytes(buf)
