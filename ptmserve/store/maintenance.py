"""Repository upkeep: garbage collection, verification and usage accounting.

Everything here works from the parsed manifests (the only source of truth): a segment is live
when some manifest references it, and shared when two models reference the same stored bytes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ptmserve.store import fsio, segments
from ptmserve.store.manifest import ManifestDoc, TensorEntry, is_segment_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    """One defect found by ``Repository.verify``, reported for the model it affects."""

    model: str
    kind: str  # "manifest" (unreadable), "missing", "truncated" or "checksum"
    message: str  # one human-readable line naming model, group, tensor and file
    group: str | None = None  # None for manifest and tokenizer problems
    tensor: str | None = None  # "tokenizer.json" for the tokenizer blob
    path: Path | None = None  # the damaged file


@dataclass(frozen=True, slots=True)
class GcReport:
    """What ``Repository.gc`` removed."""

    removed_segments: int
    removed_temp: int  # leftover temp files and folders of interrupted writes
    freed_bytes: int
    kept_segments: bool  # True when segments were left alone because a manifest was unreadable


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """Disk accounting for one model."""

    name: str
    bytes: int  # logical size: all its tensors
    shared_bytes: int  # of ``bytes``, stored once for this model and at least one other
    tensors: int


@dataclass(frozen=True, slots=True)
class RepoUsage:
    """Disk accounting for the repository (``ptmserve models``)."""

    models: tuple[ModelUsage, ...]
    logical_bytes: int  # sum of the models' ``bytes``
    stored_bytes: int  # tensor bytes actually stored: each referenced stored copy once
    disk_bytes: int  # size of all segment files (padding, tokenizers and orphans included)
    unreadable: dict[str, str] = field(default_factory=dict)  # model -> why its manifest cannot be read

    @property
    def saved_bytes(self) -> int:
        """Bytes that deduplication saves."""
        return self.logical_bytes - self.stored_bytes


def referenced_segments(docs: Mapping[str, ManifestDoc]) -> set[str]:
    """Ids of every segment some manifest references (tensors and tokenizer blobs)."""
    live = {d.tokenizer.segment for d in docs.values()}
    live.update(e.segment for d in docs.values() for e in d.tensors)
    return live


def collect_garbage(paths: fsio.RepoPaths, live: set[str] | None) -> GcReport:
    """Delete temp leftovers, and segments not in ``live`` (unless ``live`` is None).

    The caller holds the repository lock, so no write is in progress.
    """
    removed_temp = removed_segments = freed = 0
    for p in sorted(paths.tmp.iterdir()):
        if p.is_dir() and not p.is_symlink():
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p)
        else:
            freed += p.lstat().st_size
            p.unlink()
        removed_temp += 1
    if live is not None:
        for p in sorted(paths.segments.iterdir()):
            if p.suffix == segments.SEGMENT_SUFFIX and is_segment_id(p.stem) and p.stem not in live:
                freed += p.stat().st_size
                p.unlink()
                removed_segments += 1
    if removed_segments:
        fsio.fsync_dir(paths.segments)
    if removed_temp or removed_segments:
        logger.info(
            "gc: removed %d segments and %d temp files, %d bytes", removed_segments, removed_temp, freed
        )
    return GcReport(removed_segments, removed_temp, freed, kept_segments=live is None)


def verify_docs(
    paths: fsio.RepoPaths, docs: Mapping[str, ManifestDoc], unreadable: Mapping[str, str]
) -> list[Problem]:
    """Re-hash every stored byte the given models reference; report each defect per model."""
    problems = [
        Problem(model=name, kind="manifest", message=f"model {name!r}: {msg}", path=paths.manifest(name))
        for name, msg in sorted(unreadable.items())
    ]
    refs: list[segments.Located] = [e for d in docs.values() for e in d.tensors]
    refs += [d.tokenizer for d in docs.values()]
    found = segments.check_stored(paths.segments, refs)
    for name in sorted(docs):
        doc = docs[name]
        for ref in (*doc.tensors, doc.tokenizer):
            if ref not in found:
                continue
            kind, detail = found[ref]
            path = segments.segment_path(paths.segments, ref.segment)
            if isinstance(ref, TensorEntry):
                where = f"model {name!r} group {ref.group!r} tensor {ref.name!r}"
                group, tensor = ref.group, ref.name
            else:
                where, group, tensor = f"model {name!r} tokenizer", None, "tokenizer.json"
            problems.append(Problem(name, kind, f"{where}: {detail} ({path})", group, tensor, path))
    return problems


def compute_usage(paths: fsio.RepoPaths, docs: Mapping[str, ManifestDoc]) -> RepoUsage:
    """Logical vs stored bytes, per model and for the repository."""
    owners: dict[tuple[str, int], set[str]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for name, doc in docs.items():
        for e in doc.tensors:
            owners.setdefault((e.segment, e.offset), set()).add(name)
            sizes[(e.segment, e.offset)] = e.nbytes
    models = []
    for name in sorted(docs):
        tensors = docs[name].tensors
        shared = sum(e.nbytes for e in tensors if len(owners[(e.segment, e.offset)]) > 1)
        models.append(ModelUsage(name, sum(e.nbytes for e in tensors), shared, len(tensors)))
    disk = sum(p.stat().st_size for p in paths.segments.iterdir() if p.suffix == segments.SEGMENT_SUFFIX)
    return RepoUsage(
        models=tuple(models),
        logical_bytes=sum(m.bytes for m in models),
        stored_bytes=sum(sizes.values()),
        disk_bytes=disk,
    )
