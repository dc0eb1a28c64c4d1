"""Weight-format variants of a repository: ``serve --weights int8`` serves quantized copies of its models.

A variant is an ordinary repository inside the source one, ``root/variants/<weights>/``, holding every
model of the source: float models quantized to ``weights`` (``models.quant``), models already stored
quantized copied as they are. Disk, host and device tiers then all hold the small bytes. The source stays
untouched; ``sources.json`` in the variant records the sha256 of each source manifest it was made from,
so a later ``sync_variant`` converts only models imported, re-imported or removed since.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ptmserve import errors
from ptmserve.store import fsio
from ptmserve.store.manifest import WEIGHT_FORMATS, ModelManifest, manifest_to_json, torch_dtype
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

VARIANTS_FOLDER = "variants"
SOURCES_FILE = "sources.json"  # model name -> sha256 of the source manifest file it was converted from


def variant_root(source: Path, weights: str) -> Path:
    """Where the ``weights`` variant of the repository at ``source`` lives."""
    return Path(source) / VARIANTS_FOLDER / weights


def sync_variant(
    source: Repository, weights: str, *, progress: Callable[[str, int, int], None] | None = None
) -> Repository:
    """The ``weights`` variant of ``source``, brought up to date: every model of ``source`` is in it, float
    models quantized to ``weights``; models removed from ``source`` are removed from it.

    Args:
        source: the repository the models were imported into.
        weights: "int8" or "int4".
        progress: called as ``progress(model, done, total)`` after each model converted.

    Raises:
        errors.InvalidInput: ``weights`` is not a quantized format.
        errors.CorruptData: a source model's tensors fail their checksums (that model is skipped and
            logged; the error is raised only when no model could be converted at all).
    """
    if weights not in WEIGHT_FORMATS or weights == "fp":
        raise errors.InvalidInput(f"a variant's weights must be one of {WEIGHT_FORMATS[1:]}, got {weights!r}")
    target = Repository(variant_root(source.root, weights))
    sources_path = target.root / SOURCES_FILE
    made: dict[str, str] = _read_sources(sources_path)
    names = source.names()
    for gone in sorted(set(target.names()) - set(names)):
        target.remove(gone)
        made.pop(gone, None)
    stale = [n for n in names if made.get(n) != _manifest_digest(source, n) or n not in target]
    failures: list[str] = []
    for done, name in enumerate(stale, 1):
        started = time.monotonic()
        try:
            manifest = _convert(source, target, name, weights)
        except errors.PtmError as exc:
            logger.error("model %r stays out of the %s variant: %s", name, weights, exc)
            failures.append(name)
            continue
        made[name] = _manifest_digest(source, name)
        _write_sources(target, made)
        logger.info(
            "%s variant of %s: %.1f MB in %.2f s",
            manifest.weights,
            name,
            manifest.total_bytes / 1e6,
            time.monotonic() - started,
        )
        if progress is not None:
            progress(name, done, len(stale))
    if failures and len(failures) == len(stale) == len(names):
        raise errors.CorruptData(f"no model could be converted to {weights}: {failures}")
    return target


def _convert(source: Repository, target: Repository, name: str, weights: str) -> ModelManifest:
    """Store model ``name`` of ``source`` in ``target``, quantized to ``weights`` if stored in float."""
    from ptmserve.models import registry  # heavy imports, only needed here
    from ptmserve.store.importer import quantize_tensors

    m = source.manifest(name)
    tensors: dict[str, torch.Tensor] = {}
    for group in m.group_names():
        tensors.update(source.read_group(name, group))
    stored_as = m.weights
    if m.weights == "fp":
        config = registry.config_from_dict(m.architecture, dict(m.config))
        tensors = quantize_tensors(m.architecture, config, tensors, weights, torch_dtype(m.dtype))
        stored_as = weights
    return target.add_model(
        name,
        config=m.config,
        pooling=m.pooling,
        tokenizer_json=bytes(m.tokenizer_json),
        dtype=m.dtype,
        tensors=tensors,
        max_length=m.max_length,
        architecture=m.architecture,
        group_order=m.group_names(),
        generation=m.generation,
        calibration=m.calibration,
        weights=stored_as,
    )


def _manifest_digest(repo: Repository, name: str) -> str:
    doc = json.dumps(manifest_to_json(repo.manifest(name)), sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _read_sources(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}  # no record (or a damaged one): every model is converted again
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _write_sources(target: Repository, made: dict[str, str]) -> None:
    tmp = fsio.write_temp(target.root / "tmp", [json.dumps(made, indent=1, sort_keys=True).encode()])
    fsio.rename_durable(tmp, target.root / SOURCES_FILE)
