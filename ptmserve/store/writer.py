"""Writing one model into the repository: dedup by sha256, one segment per group, manifest last.

The caller holds the repository lock. Order of durable steps: new segments (each temp, fsync,
rename), the tokenizer blob, then the manifest rename, which is the single commit point.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptmserve import errors
from ptmserve.store import fsio, segments
from ptmserve.store.manifest import (
    MODEL_DTYPES,
    WEIGHT_FORMATS,
    BlobRef,
    ManifestDoc,
    TensorEntry,
    dtype_name,
    group_order_key,
    manifest_to_json,
    tensor_group,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(new_bytes_written, new_bytes_total)`` after each segment is published."""


@dataclass(slots=True)
class _Item:
    name: str
    data: memoryview
    sha: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class _Placed:
    """Where an item will live: an existing location, or an offset in a builder of this import."""

    item: _Item
    segment: str | None  # known for reused locations
    builder: str | None  # group whose builder holds the bytes
    offset: int


def _prepare(tensors: Mapping[str, torch.Tensor], group_order: Sequence[str]) -> dict[str, list[_Item]]:
    if not tensors:
        raise errors.InvalidInput("a model needs at least one tensor")
    groups: dict[str, list[_Item]] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise errors.InvalidInput(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        data = segments.tensor_bytes(t)
        item = _Item(name, data, segments.sha256_hex(data), dtype_name(t.dtype), tuple(t.shape))
        groups.setdefault(tensor_group(name), []).append(item)
    rank = {g: i for i, g in enumerate(group_order)}
    return {g: groups[g] for g in sorted(groups, key=lambda g: (rank.get(g, len(rank)), group_order_key(g)))}


class _Reuse:
    """Stored locations by sha256, handed out only after re-hashing the stored bytes once."""

    def __init__(self, seg_dir: Path, existing: Sequence[ManifestDoc]) -> None:
        self._seg_dir = seg_dir
        self._by_sha: dict[str, list[TensorEntry]] = {}
        for doc in existing:
            for e in doc.tensors:
                self._by_sha.setdefault(e.sha256, []).append(e)
        self._checked: dict[tuple[str, int], bool] = {}

    def find(self, sha: str, nbytes: int) -> TensorEntry | None:
        for e in self._by_sha.get(sha, ()):
            if e.nbytes != nbytes:
                continue
            key = (e.segment, e.offset)
            if key not in self._checked:
                path = segments.segment_path(self._seg_dir, e.segment)
                self._checked[key] = segments.hash_stored(path, e.offset, e.nbytes) == sha
                if not self._checked[key]:
                    logger.warning("stored copy of tensor %s in %s is damaged; storing it again", sha, path)
            if self._checked[key]:
                return e
        return None


def _plan(
    groups: dict[str, list[_Item]], reuse: _Reuse
) -> tuple[dict[str, list[_Placed]], dict[str, segments.SegmentBuilder]]:
    placed: dict[str, list[_Placed]] = {}
    builders: dict[str, segments.SegmentBuilder] = {}
    pending: dict[str, _Placed] = {}  # sha -> first placement in this import (tied weights)
    for group, items in groups.items():
        out = placed.setdefault(group, [])
        for item in items:
            if item.sha in pending:
                first = pending[item.sha]
                out.append(_Placed(item, first.segment, first.builder, first.offset))
                continue
            hit = reuse.find(item.sha, len(item.data))
            if hit is not None:
                p = _Placed(item, hit.segment, None, hit.offset)
            else:
                b = builders.setdefault(group, segments.SegmentBuilder())
                p = _Placed(item, None, group, b.add(item.data, item.sha))
            pending[item.sha] = p
            out.append(p)
    return placed, builders


def write_model(
    paths: fsio.RepoPaths,
    existing: Sequence[ManifestDoc],
    *,
    name: str,
    config: dict[str, Any],
    pooling: dict[str, Any],
    tokenizer_json: bytes,
    dtype: str,
    tensors: Mapping[str, torch.Tensor],
    max_length: int | None = None,
    progress: ProgressFn | None = None,
    architecture: str = "",
    group_order: Sequence[str] = (),
    generation: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    weights: str = "fp",
) -> ManifestDoc:
    """Store a model's new bytes and publish its manifest (the caller holds the repository lock).

    Args:
        paths: the repository's folders.
        existing: manifests of the stored models, whose tensors may be reused.
        name, config, pooling, tokenizer_json, dtype, tensors, max_length, generation, calibration,
            weights: see ``Repository.add_model``.
        progress: optional callback after each new segment.

    Returns:
        The published manifest (without tokenizer bytes).

    Raises:
        errors.InvalidInput: bad dtype, tensor, or a config/pooling/calibration that is not JSON.
        OSError: the disk failed; nothing is published in that case.
    """
    if dtype not in MODEL_DTYPES:
        raise errors.InvalidInput(f"model dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    if weights not in WEIGHT_FORMATS:
        raise errors.InvalidInput(f"weight format must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if not isinstance(tokenizer_json, bytes | bytearray | memoryview):
        raise errors.InvalidInput("tokenizer_json must be bytes")
    if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
        raise errors.InvalidInput(f"max_length must be a positive int or None, got {max_length!r}")
    try:
        json.dumps([config, pooling, dict(generation or {})])
    except (TypeError, ValueError) as exc:
        raise errors.InvalidInput(
            f"config, pooling and generation must be JSON-serialisable: {exc}"
        ) from None
    try:  # strict JSON: NaN and infinities would not read back elsewhere
        json.dumps(dict(calibration or {}), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidInput(
            f"calibration must be JSON-serialisable without NaN or inf: {exc}"
        ) from None

    placed, builders = _plan(_prepare(tensors, group_order), _Reuse(paths.segments, existing))
    ids = {g: b.segment_id for g, b in builders.items()}
    total = sum(b.size for b in builders.values())
    done = 0
    for group, b in builders.items():
        segments.publish(paths.segments, paths.tmp, ids[group], b.chunks())
        done += b.size
        logger.debug("model %s: wrote segment %s for %s (%d bytes)", name, ids[group], group, b.size)
        if progress is not None:
            progress(done, total)

    tokenizer = _store_blob(paths, bytes(tokenizer_json))
    groups = {
        g: tuple(
            TensorEntry(
                name=p.item.name,
                dtype=p.item.dtype,
                shape=p.item.shape,
                sha256=p.item.sha,
                segment=p.segment if p.builder is None else ids[p.builder],
                offset=p.offset,
                nbytes=len(p.item.data),
            )
            for p in ps
        )
        for g, ps in placed.items()
    }
    doc = ManifestDoc(
        name,
        dict(config),
        dict(pooling),
        tokenizer,
        dtype,
        groups,
        max_length,
        architecture or config.get("family", ""),
        dict(generation or {}),
        dict(calibration or {}),
        weights,
    )
    body = json.dumps(manifest_to_json(doc), indent=1).encode()
    tmp = fsio.write_temp(paths.tmp, [body], suffix=".json.tmp")
    fsio.rename_durable(tmp, paths.manifest(name))
    logger.info(
        "stored model %s: %d tensors, %d bytes, %d new bytes in %d segments",
        name,
        len(doc.tensors),
        sum(e.nbytes for e in doc.tensors),
        total,
        len(builders),
    )
    return doc


def _store_blob(paths: fsio.RepoPaths, data: bytes) -> BlobRef:
    """Store ``data`` as its own segment named by its sha256, unless an intact copy is there."""
    sha = segments.sha256_hex(data)
    path = segments.segment_path(paths.segments, sha)
    if segments.hash_stored(path, 0, len(data)) != sha or path.stat().st_size != len(data):
        segments.publish(paths.segments, paths.tmp, sha, iter([data]))
    return BlobRef(segment=sha, offset=0, nbytes=len(data), sha256=sha)
