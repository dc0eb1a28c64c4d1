"""What the engine knows about each model without loading its weights: info and tokenizer.

Thread-safe: callers tokenize in their own threads, so the worker only computes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ptmserve.engine.api import ModelInfo, ModelKind, ModelState
from ptmserve.errors import InvalidInput
from ptmserve.models.config import EncoderConfig
from ptmserve.models.tokenizer import TextTokenizer, check_ids
from ptmserve.store.manifest import ModelManifest
from ptmserve.store.repository import Repository


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    manifest: ModelManifest
    config: EncoderConfig
    tokenizer: TextTokenizer
    max_tokens: int  # the truncation length
    device_bytes: int  # its weights on the device, in the compute dtype


class ModelCatalog:
    """Per-model metadata and tokenizers read from the repository, cached until the manifest changes."""

    def __init__(self, repo: Repository, compute_dtype: str, *, truncate: bool = True) -> None:
        self._repo = repo
        self._compute_dtype = compute_dtype
        self._truncate = truncate
        self._entries: dict[str, CatalogEntry] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return self._repo.names()

    def entry(self, name: str) -> CatalogEntry:
        """The cached entry of ``name``. Raises ModelNotFound (or InvalidInput for a bad name)."""
        manifest = self._repo.manifest(name)
        with self._lock:
            cached = self._entries.get(name)
            if cached is not None and cached.manifest == manifest:
                return cached
        config = EncoderConfig.from_dict(manifest.config)
        max_tokens = min(manifest.max_length or config.max_tokens, config.max_tokens)
        # Without truncation, tokenize one token past the limit so that too-long inputs are seen.
        limit = max_tokens if self._truncate else max_tokens + 1
        tokenizer = TextTokenizer.from_json(manifest.tokenizer_json, limit)
        entry = CatalogEntry(manifest, config, tokenizer, max_tokens, self._device_bytes(manifest))
        with self._lock:
            self._entries[name] = entry
        return entry

    def device_bytes(self, name: str) -> int:
        """Bytes ``name``'s weights take on the device, in the compute dtype (floating tensors are cast)."""
        return self.entry(name).device_bytes

    def forget(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def _device_bytes(self, manifest: ModelManifest) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self._compute_dtype]
        total = 0
        for t in manifest.tensors:
            floating = t.dtype in ("float32", "bfloat16", "float16")
            total += math.prod(t.shape) * itemsize if floating else t.nbytes
        return total

    def info(self, name: str, state: ModelState, reason: str = "") -> ModelInfo:
        e = self.entry(name)
        return ModelInfo(
            name=name,
            kind=ModelKind.CLASSIFIER if e.config.labels else ModelKind.EMBEDDING,
            dim=e.config.hidden_size,
            labels=tuple(e.config.labels),
            max_tokens=e.max_tokens,
            vocab_size=e.config.vocab_size,
            dtype=self._compute_dtype,
            stored_bytes=e.manifest.total_bytes,
            state=state,
            reason=reason,
        )

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
            ids = e.tokenizer.encode(list(inputs))  # type: ignore[arg-type]
            if limit is not None:
                check_ids(ids, e.config.vocab_size, limit)
            return ids
        for i, x in enumerate(inputs):
            if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
                raise InvalidInput(f"input[{i}] must be a text or a list of token ids, like the others")
        ids = [list(x) for x in inputs]  # type: ignore[arg-type]
        check_ids(ids, e.config.vocab_size, limit)
        return ids if limit is not None else [x[: e.max_tokens] for x in ids]
