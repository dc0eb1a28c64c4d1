"""The model repository: a folder of manifests and content-addressed segment files.

On-disk layout (``root`` defaults to ``./models``)::

    root/
      repository.json             {"format": 1}
      lock                        flock'ed by writers (import, remove, gc); readers never lock
      manifests/<name>.json       one per model: config, pooling, dtype, max_length, tokenizer ref,
                                  and per layer group ("embeddings", "layers.0" ... "head") its
                                  tensors as {name, dtype, shape, sha256, segment, offset, nbytes}
      segments/<id>.seg           immutable. A tensor segment holds the tensors one import added to
                                  one layer group, back to back, each 64-byte aligned; its id is the
                                  sha256 of its table of contents (offsets, lengths, tensor sha256s).
                                  A tokenizer blob is a segment named by the sha256 of its bytes.
      tmp/                        files being written; anything here is a leftover that gc() removes
      profiles/<name>.json        optional: what each load group of the model costs where
                                  (``ptmserve profile``; ``memory/placement.ModelProfile``)

Identical tensors (same sha256) are stored once: an import writes only tensors not already stored,
so fine-tunes that share a frozen backbone share its segments, and importing a checkpoint a second
time writes no segment at all. There is no separate index: the map sha256 -> location is derived
from the manifests. An import writes its segments (temp file, fsync, rename), then the tokenizer
blob, then renames the manifest into place: that rename is the commit, so a crash at any point
leaves the old state plus unreferenced files that ``gc()`` removes (it also runs before every
import). Every tensor is checked against its sha256 when read (unless the caller opts out) and by
``verify()``; a damaged file only affects the models that reference it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ptmserve import errors
from ptmserve.store import fsio, maintenance, segments, writer
from ptmserve.store.maintenance import GcReport, Problem, RepoUsage
from ptmserve.store.manifest import (
    FORMAT_VERSION,
    ManifestDoc,
    ModelManifest,
    TensorEntry,
    manifest_from_json,
    validate_name,
)

logger = logging.getLogger(__name__)

__all__ = ["GcReport", "ModelManifest", "Problem", "RepoUsage", "Repository", "TensorEntry"]


class Repository:
    """A folder of stored models, safe to read from many threads and processes at once.

    Writers (``add_model``, ``remove``, ``gc``) serialise on a file lock; readers see each model
    either before or after a write, never half of one. Manifests are cached and re-read when their
    file changes, so a model re-imported by another process is picked up.
    """

    def __init__(self, root: str | os.PathLike[str] = "models", *, create: bool = True) -> None:
        """Open the repository at ``root``.

        Args:
            root: the repository folder.
            create: create the folder and its layout if missing.

        Raises:
            errors.InvalidConfig: ``root`` is missing (and ``create`` is False), not a folder, or of an
                unknown format.
        """
        self._paths = fsio.RepoPaths(Path(root))
        marker = self._paths.root / "repository.json"
        if self._paths.root.exists() and not self._paths.root.is_dir():
            raise errors.InvalidConfig(f"model repository {str(self._paths.root)!r} is not a folder")
        if not self._paths.root.is_dir() and not create:
            raise errors.InvalidConfig(f"model repository {str(self._paths.root)!r} does not exist")
        if marker.exists():
            try:
                fmt = json.loads(marker.read_text())["format"]
            except (ValueError, KeyError, TypeError):
                fmt = None
            if fmt != FORMAT_VERSION:
                raise errors.InvalidConfig(f"model repository {str(marker)!r} has unknown format {fmt!r}")
        elif create:
            self._paths.create()
            tmp = fsio.write_temp(self._paths.tmp, [json.dumps({"format": FORMAT_VERSION}).encode()])
            fsio.rename_durable(tmp, marker)
        self._paths.create()
        self._cache_lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], ModelManifest]] = {}

    @property
    def root(self) -> Path:
        """The repository folder."""
        return self._paths.root

    # ------------------------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        """Names of the stored models, sorted."""
        found = []
        for p in self._paths.manifests.glob(f"*{fsio.MANIFEST_SUFFIX}"):
            name = p.name[: -len(fsio.MANIFEST_SUFFIX)]
            try:
                found.append(validate_name(name))
            except errors.InvalidInput:
                continue
        return sorted(found)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def manifest(self, name: str) -> ModelManifest:
        """The manifest of model ``name``, tokenizer bytes included (checked against their sha256).

        Raises:
            errors.InvalidInput: invalid name.
            errors.ModelNotFound: no such model.
            errors.CorruptData: the manifest or the tokenizer blob is damaged.
        """
        path = self._paths.manifest(validate_name(name))
        try:
            st = path.stat()
        except FileNotFoundError:
            raise errors.ModelNotFound(f"model {name!r} is not in the repository") from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            hit = self._cache.get(name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        doc = self._read_doc(name)
        tok = segments.read_blob(self._paths.segments, doc.tokenizer, f"model {name!r} tokenizer")
        m = doc.with_tokenizer(tok)
        with self._cache_lock:
            self._cache[name] = (sig, m)
        return m

    def group_entries(self, name: str, group: str) -> list[TensorEntry]:
        """The tensor entries of one layer group of model ``name``.

        Raises:
            errors.ModelNotFound: no such model.
            errors.InvalidInput: invalid name or no such group.
        """
        return list(self.manifest(name).entries(group))

    def segment_paths(self, name: str) -> list[Path]:
        """Every file model ``name`` reads (its tensor segments and tokenizer blob).

        Raises:
            errors.ModelNotFound: no such model.
        """
        return [segments.segment_path(self._paths.segments, s) for s in self.manifest(name).segment_ids()]

    # -------------------------------------------------------------------------------------- reads

    def read_group(
        self, name: str, group: str, *, verify: bool = True, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Read one layer group of model ``name``.

        Entries that sit together in a segment are read with one large request into one buffer;
        the tensors are views of it (tensors with identical bytes may share storage).

        Args:
            name: the model.
            group: "embeddings", "layers.<i>", "head", ... (see ``ModelManifest.group_names()``).
            verify: check every tensor against its sha256 (skip only for bytes already verified).
            device: move the tensors there after reading; default: host (CPU) tensors.

        Returns:
            ``{tensor name: tensor}`` with the stored dtype and shape.

        Raises:
            errors.ModelNotFound: no such model.
            errors.InvalidInput: no such group.
            errors.CorruptData: a segment is missing, truncated, or fails its checksum; the message
                names the model, group, tensor and file.
        """
        entries = self.manifest(name).entries(group)
        out = segments.read_tensors(self._paths.segments, entries, verify=verify, model=name)
        if device is not None and torch.device(device).type != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def read_into(
        self,
        entries: Sequence[TensorEntry],
        out: Mapping[str, torch.Tensor],
        *,
        verify: bool = True,
        model: str = "?",
    ) -> None:
        """Read each entry's bytes straight into the preallocated ``out[entry.name]``.

        Args:
            entries: from ``group_entries`` or ``manifest(...).entries(...)``.
            out: contiguous CPU tensors (pinned or not), each exactly ``entry.nbytes`` bytes; their
                dtype and shape are the caller's business.
            verify: check every tensor against its sha256.
            model: the model name to quote in errors.

        Raises:
            errors.InvalidInput: an output tensor is missing or unsuitable.
            errors.CorruptData: a segment is missing, truncated, or fails its checksum.
        """
        segments.read_into(self._paths.segments, entries, dict(out), verify=verify, model=model)

    # ------------------------------------------------------------------------------------- writes

    def add_model(
        self,
        name: str,
        *,
        config: dict[str, Any],
        pooling: dict[str, Any],
        tokenizer_json: bytes,
        dtype: str,
        tensors: Mapping[str, torch.Tensor],
        max_length: int | None = None,
        progress: writer.ProgressFn | None = None,
        architecture: str = "",
        group_order: Sequence[str] = (),
        generation: Mapping[str, Any] | None = None,
        calibration: Mapping[str, Any] | None = None,
        weights: str = "fp",
    ) -> ModelManifest:
        """Store a model atomically, replacing any model of the same name.

        Only tensors whose bytes are not stored yet are written. Until the call returns, readers
        see the previous state; if the process dies midway, they keep seeing it.

        Args:
            name: model name (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``).
            config: the architecture's config, ``config.to_dict()`` of its family's config type.
            architecture: the registry name of the model's family (``models.registry``).
            pooling: pooling settings (JSON-serialisable).
            tokenizer_json: the bytes of tokenizer.json.
            dtype: the model's dtype: "float32", "bfloat16" or "float16".
            tensors: our parameter names -> tensors (any device; the group is the name's prefix).
            max_length: truncation length in tokens, special tokens included (None: the config's).
            group_order: the load groups in execution order (the family's); others sort by name.
            generation: a decoder's generation settings (chat template, special tokens), JSON-serialisable.
            calibration: how the model was calibrated (early exit: thresholds, matrices, validation
                metrics), strict JSON (no NaN or inf); stored only when non-empty.
            weights: how the linear layers in ``tensors`` are stored: "fp", "int8" or "int4"
                (``models.quant``); float tensors other than those are in ``dtype``.
            progress: called as ``progress(new_bytes_written, new_bytes_total)`` per new segment.

        Returns:
            The stored manifest.

        Raises:
            errors.InvalidInput: bad name, dtype, tensor name or tensor, or non-JSON config.
            OSError: the disk failed (nothing is published).
        """
        validate_name(name)
        with fsio.exclusive_lock(self._paths.lock):
            live, docs = self._live_segments()
            maintenance.collect_garbage(self._paths, live)
            writer.write_model(
                self._paths,
                list(docs.values()),
                name=name,
                config=config,
                pooling=pooling,
                tokenizer_json=tokenizer_json,
                dtype=dtype,
                tensors=tensors,
                max_length=max_length,
                progress=progress,
                architecture=architecture,
                group_order=group_order,
                generation=generation,
                calibration=calibration,
                weights=weights,
            )
        return self.manifest(name)

    def remove(self, name: str, *, collect: bool = True) -> None:
        """Delete model ``name``; with ``collect``, also free segments no other model uses.

        Raises:
            errors.ModelNotFound: no such model.
            errors.InvalidInput: invalid name.
        """
        path = self._paths.manifest(validate_name(name))
        with fsio.exclusive_lock(self._paths.lock):
            try:
                path.unlink()
            except FileNotFoundError:
                raise errors.ModelNotFound(f"model {name!r} is not in the repository") from None
            fsio.fsync_dir(path.parent)
            with self._cache_lock:
                self._cache.pop(name, None)
            with contextlib.suppress(FileNotFoundError):
                self._profile_path(name).unlink()
            if collect:
                maintenance.collect_garbage(self._paths, self._live_segments()[0])
        logger.info("removed model %s", name)

    def gc(self) -> GcReport:
        """Remove segments no manifest references and leftover temp files.

        Segments are kept (``kept_segments``) if any manifest is unreadable, so a damaged manifest
        never causes its model's data to be deleted.
        """
        with fsio.exclusive_lock(self._paths.lock):
            return maintenance.collect_garbage(self._paths, self._live_segments()[0])

    # ---------------------------------------------------------------------------------- profiles

    def profile(self, name: str) -> dict[str, Any] | None:
        """The stored profile document of model ``name`` (``ModelProfile.from_dict`` reads it), or None.

        Raises:
            errors.InvalidInput: invalid name.
            errors.CorruptData: the file is unreadable or not a JSON object (the message names the model).
        """
        path = self._profile_path(validate_name(name))
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise errors.CorruptData(f"the stored profile of model {name!r} is unreadable: {exc}") from None
        if not isinstance(doc, dict):
            raise errors.CorruptData(f"the stored profile of model {name!r} is not a JSON object")
        return doc

    def save_profile(self, name: str, doc: Mapping[str, Any]) -> None:
        """Store ``doc`` (strict JSON) as the profile of model ``name``, replacing any, atomically.

        A profile is derived data, valid while the weights it was measured on are unchanged (it records
        their id), so a re-import does not remove it. It is written without the repository lock, which
        an import holds for as long as it runs: the serving process stores profiles lazily and must not
        wait for that. Its temp file sits next to it, where ``gc()`` (which clears ``tmp/``) cannot
        remove it halfway.

        Raises:
            errors.InvalidInput: invalid name, or ``doc`` is not strict JSON (NaN, inf, other types).
            errors.ModelNotFound: no such model.
            OSError: the disk failed (the previous profile is kept).
        """
        validate_name(name)
        if not self._paths.manifest(name).exists():
            raise errors.ModelNotFound(f"model {name!r} is not in the repository")
        try:
            body = json.dumps(doc, indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise errors.InvalidInput(f"the profile of model {name!r} is not strict JSON: {exc}") from None
        path = self._profile_path(name)
        path.parent.mkdir(exist_ok=True)
        fsio.rename_durable(fsio.write_temp(path.parent, [body], suffix=".json.tmp"), path)

    def _profile_path(self, name: str) -> Path:
        return self._paths.root / "profiles" / f"{name}.json"

    # ------------------------------------------------------------------------------ maintenance

    def verify(self, name: str | None = None) -> list[Problem]:
        """Re-hash every stored byte of one model (or all) against its sha256.

        Returns:
            The defects found, each attributed to a model (empty when all is well). A file shared
            by several models is reported once per affected model.

        Raises:
            errors.ModelNotFound: ``name`` is given and not stored.
        """
        names = self.names() if name is None else [validate_name(name)]
        if name is not None and name not in self.names():
            raise errors.ModelNotFound(f"model {name!r} is not in the repository")
        docs, unreadable = self._read_docs(names)
        return maintenance.verify_docs(self._paths, docs, unreadable)

    def usage(self) -> RepoUsage:
        """Logical vs stored bytes per model and for the repository; unreadable manifests are listed in
        ``unreadable`` with their error."""
        docs, unreadable = self._read_docs(self.names())
        return dataclasses.replace(maintenance.compute_usage(self._paths, docs), unreadable=unreadable)

    # ---------------------------------------------------------------------------------- internals

    def _read_doc(self, name: str) -> ManifestDoc:
        path = self._paths.manifest(name)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise errors.ModelNotFound(f"model {name!r} is not in the repository") from None
        except ValueError as exc:
            raise errors.CorruptData(f"the manifest of model {name!r} is not valid JSON: {exc}") from None
        doc = manifest_from_json(raw, f"of model {name!r}")
        if doc.name != name:
            raise errors.CorruptData(f"the manifest of model {name!r} names model {doc.name!r}")
        return doc

    def _read_docs(self, names: Sequence[str]) -> tuple[dict[str, ManifestDoc], dict[str, str]]:
        docs: dict[str, ManifestDoc] = {}
        unreadable: dict[str, str] = {}
        for n in names:
            try:
                docs[n] = self._read_doc(n)
            except errors.CorruptData as exc:
                unreadable[n] = exc.message
            except errors.ModelNotFound:
                continue  # removed meanwhile
        return docs, unreadable

    def _live_segments(self) -> tuple[set[str] | None, dict[str, ManifestDoc]]:
        """Referenced segment ids (None if a manifest is unreadable) and the readable manifests."""
        docs, unreadable = self._read_docs(self.names())
        for n, msg in unreadable.items():
            logger.warning("unreadable manifest for model %s (%s): keeping all segments", n, msg)
        return (None if unreadable else maintenance.referenced_segments(docs)), docs
