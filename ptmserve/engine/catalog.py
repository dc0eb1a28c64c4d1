"""What the engine knows about each model without loading its weights: info, config and tokenizer.

The catalog is held in memory. ``refresh`` re-reads the repository's model list (one ``stat`` per
manifest, at most every ``refresh_seconds``, or at once when forced), so the scheduler and the request
path never read manifests from disk themselves. A manifest that cannot be read is listed with its error
(the model is unavailable); one that disappears is dropped. One damaged model never hides the others.

Thread-safe: callers tokenize in their own threads, so the worker only computes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ptmserve.engine.api import ModelInfo, ModelKind, ModelState
from ptmserve.errors import CorruptData, InvalidInput, ModelNotFound, PtmError
from ptmserve.models import registry
from ptmserve.models.registry import ModelConfig
from ptmserve.models.tokenizer import TextTokenizer, check_ids
from ptmserve.store.manifest import ModelManifest, validate_name
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

_FLOATING = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One readable model."""

    manifest: ModelManifest
    config: ModelConfig
    max_tokens: int  # the truncation length
    device_bytes: int  # its weights on the device as placed, in the compute dtype, each tensor once
    generates: bool = False  # a text generation model (its family's ``generates``)
    host_groups: frozenset[str] = frozenset()  # its load groups placed in the host tier
    weight_bytes: int = 0  # all its weights in the compute dtype, each tensor once (what it computes with)

    @property
    def kind(self) -> ModelKind:
        if self.generates:
            return ModelKind.GENERATOR
        return ModelKind.CLASSIFIER if self.config.labels else ModelKind.EMBEDDING


class ModelCatalog:
    """Per-model metadata read from the repository, kept in memory, and tokenizers built on first use."""

    def __init__(
        self,
        repo: Repository,
        compute_dtype: str,
        *,
        truncate: bool = True,
        refresh_seconds: float = 0.5,
        placement: Callable[[ModelManifest], frozenset[str]] | None = None,
    ) -> None:
        self._repo = repo
        self._placement = placement  # load groups of a model left in the host tier (None: none)
        self._compute_dtype = compute_dtype
        self._truncate = truncate
        self._refresh_seconds = refresh_seconds
        self._entries: dict[str, CatalogEntry] = {}
        self._damaged: dict[str, str] = {}  # model -> why its manifest cannot be read
        self._tokenizers: dict[str, tuple[ModelManifest, TextTokenizer]] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshed_at = -math.inf

    # -- the model list -------------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> None:
        """Bring the catalog up to date with the repository (a no-op within ``refresh_seconds`` of the
        last refresh unless ``force``)."""
        if not force and time.monotonic() - self._refreshed_at < self._refresh_seconds:
            return
        with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed_at < self._refresh_seconds:
                return
            entries: dict[str, CatalogEntry] = {}
            damaged: dict[str, str] = {}
            for name in self._repo.names():
                try:
                    entries[name] = self._read(name)
                except ModelNotFound:
                    continue  # removed between listing and reading
                except PtmError as exc:
                    damaged[name] = exc.message
            with self._lock:
                for name in set(damaged) - set(self._damaged):
                    logger.error("model %s is unavailable: %s", name, damaged[name])
                self._entries, self._damaged = entries, damaged
                for name in set(self._tokenizers) - set(entries):
                    del self._tokenizers[name]
            self._refreshed_at = time.monotonic()

    def _read(self, name: str) -> CatalogEntry:
        manifest = self._repo.manifest(name)  # cached by the repository until the file changes
        with self._lock:
            cached = self._entries.get(name)
        if (
            cached is not None
            and cached.manifest is manifest
            and self._placed(manifest, cached.config) == cached.host_groups
        ):
            return cached  # nothing changed: no config to parse again
        try:
            family = registry.get(manifest.architecture, manifest.weights)
            config = family.config_from_dict(manifest.config)
        except PtmError as exc:
            raise CorruptData(f"model {name!r}: its stored config cannot be used: {exc.message}") from None
        placed = self._placed(manifest, config)
        max_tokens = min(manifest.max_length or config.max_tokens, config.max_tokens)
        nbytes = self._device_bytes(manifest, placed)
        weights = self._device_bytes(manifest, frozenset()) if placed else nbytes
        return CatalogEntry(manifest, config, max_tokens, nbytes, family.generates, placed, weights)

    def _placed(self, manifest: ModelManifest, config: ModelConfig) -> frozenset[str]:
        """The model's host-placed groups, as the weight manager places them (tied groups stay on the
        device)."""
        if self._placement is None:
            return frozenset()
        return self._placement(manifest) - registry.get(manifest.architecture).tied_groups(config)

    def names(self) -> list[str]:
        """Every model in the repository, damaged ones included, sorted."""
        self.refresh()
        with self._lock:
            return sorted({*self._entries, *self._damaged})

    def entry(self, name: str) -> CatalogEntry:
        """The entry of ``name``.

        Raises:
            InvalidInput: a malformed name.
            ModelNotFound: no such model.
            CorruptData: its manifest cannot be read (the message says why).
        """
        validate_name(name)
        self.refresh()
        found = self._lookup(name)
        if found is None:
            self.refresh(force=True)  # imported a moment ago?
            found = self._lookup(name)
        if found is None:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return found

    def _lookup(self, name: str) -> CatalogEntry | None:
        """The entry of ``name`` as last refreshed, None when not listed; CorruptData when damaged."""
        with self._lock:
            found = self._entries.get(name)
            damaged = self._damaged.get(name)
        if damaged is not None:
            raise CorruptData(damaged)
        return found

    def damage(self, name: str) -> str | None:
        """Why ``name``'s manifest cannot be read, or None."""
        with self._lock:
            return self._damaged.get(name)

    def device_bytes(self, name: str) -> int:
        """Bytes ``name``'s weights take on the device as placed, in the compute dtype, each distinct tensor
        once (0 for a model not listed)."""
        with self._lock:
            found = self._entries.get(name)
        return found.device_bytes if found is not None else 0

    def weight_bytes(self, name: str) -> int:
        """Bytes of all of ``name``'s weights in the compute dtype, host-placed groups included."""
        with self._lock:
            found = self._entries.get(name)
        return found.weight_bytes if found is not None else 0

    def _device_bytes(self, manifest: ModelManifest, host_groups: frozenset[str]) -> int:
        """As the weight manager places them: a tensor is on the device when a device-placed group uses it."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self._compute_dtype]
        placed = {
            t.sha256: math.prod(t.shape) * itemsize if t.dtype in _FLOATING else t.nbytes
            for group in manifest.group_names()
            if group not in host_groups
            for t in manifest.entries(group)
        }
        return sum(placed.values())

    def info(self, name: str, state: ModelState, reason: str = "") -> ModelInfo:
        """What clients see of ``name``; a damaged model is UNAVAILABLE with its error as the reason."""
        try:
            e = self.entry(name)
        except CorruptData as exc:
            return ModelInfo(
                name,
                ModelKind.EMBEDDING,
                0,
                (),
                0,
                0,
                self._compute_dtype,
                0,
                ModelState.UNAVAILABLE,
                exc.message,
            )
        return ModelInfo(
            name=name,
            kind=e.kind,
            dim=e.config.hidden_size,
            labels=tuple(e.config.labels),
            max_tokens=e.max_tokens,
            vocab_size=e.config.vocab_size,
            dtype=self._compute_dtype,
            stored_bytes=e.manifest.total_bytes,
            state=state,
            reason=reason,
        )

    # -- tokenization ---------------------------------------------------------------------------------

    def has_tokenizer(self, name: str) -> bool:
        """Whether ``name``'s tokenizer is parsed already (so tokenizing a little text is cheap)."""
        with self._lock:
            return name in self._tokenizers

    def tokenizer(self, name: str) -> TextTokenizer:
        """``name``'s tokenizer, parsed on first use (off the event loop: callers run in threads)."""
        e = self.entry(name)
        with self._lock:
            cached = self._tokenizers.get(name)
        if cached is not None and cached[0] is e.manifest:
            return cached[1]
        # Without truncation, tokenize one token past the limit so that too-long inputs are seen.
        limit = e.max_tokens if self._truncate else e.max_tokens + 1
        tok = TextTokenizer.from_json(e.manifest.tokenizer_json, limit)
        with self._lock:
            self._tokenizers[name] = (e.manifest, tok)
        return tok

    def tokenize(self, name: str, inputs: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Turn texts or token-id lists into token ids the model accepts.

        Texts are tokenized with the model's tokenizer (special tokens added, truncated at the model's
        maximum). Token ids are used as given. Inputs longer than the maximum are truncated
        when the catalog truncates, else refused.

        Raises:
            InvalidInput: empty input list, an empty text, an empty or out-of-range id list, mixed types.
        """
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise InvalidInput("input must be a non-empty list of texts or of token-id lists")
        e = self.entry(name)
        limit = None if self._truncate else e.max_tokens  # refuse, rather than truncate, longer inputs
        if all(isinstance(x, str) for x in inputs):
            for i, text in enumerate(inputs):
                if not text:
                    raise InvalidInput(f"input[{i}] is an empty string")
            ids = self.tokenizer(name).encode(list(inputs))  # type: ignore[arg-type]
            if limit is not None:
                check_ids(ids, e.config.vocab_size, limit)
            return ids
        for i, x in enumerate(inputs):
            if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
                raise InvalidInput(f"input[{i}] must be a text or a list of token ids, like the others")
        ids = [list(x) for x in inputs]  # type: ignore[arg-type]
        check_ids(ids, e.config.vocab_size, limit)
        return ids if limit is not None else [x[: e.max_tokens] for x in ids]
