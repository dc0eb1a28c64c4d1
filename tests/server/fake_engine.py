"""A deterministic stand-in for ``ptmserve.engine.engine.Engine``, kept for ``test_bench_http.py`` only.

That test checks the HTTP benchmark's load generator (its raw keep-alive client), not the product: it
needs a server whose answers it can predict exactly (``fake_vector``), quickly, many times. Every test of
the server's own behaviour runs over the real engine with tiny random models (see ``conftest.py``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    InferenceOptions,
    ModelInfo,
    ModelKind,
    ModelState,
    TierUsage,
)
from ptmserve.engine.metrics import EngineMetrics
from ptmserve.errors import InvalidInput, ModelNotFound

DIM = 8


def fake_vector(item: str | list[int], dim: int = DIM) -> np.ndarray:
    """The embedding the fake engine returns for one input."""
    key = item.encode() if isinstance(item, str) else np.asarray(item, np.int64).tobytes()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEngine:
    """One embedding model, ``emb``, whose embeddings are ``fake_vector`` of each input."""

    def __init__(self) -> None:
        self.metrics = EngineMetrics()
        self._info = ModelInfo(
            "emb", ModelKind.EMBEDDING, DIM, (), 16, 100, "float32", 1000, ModelState.READY
        )

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def model_info(self, name: str) -> ModelInfo:
        if name != self._info.name:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return self._info

    def load(self, name: str) -> None:
        self.model_info(name)

    def unload(self, name: str) -> None:
        self.model_info(name)

    def ready(self) -> bool:
        return True

    def unready_reason(self) -> str | None:
        return None

    def tiers(self) -> list[TierUsage]:
        return [TierUsage("host", 1000, 10_000, {"emb": 1000})]

    def close(self, drain_seconds: float = 30.0) -> None:
        pass

    def embed(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> EmbedResult:
        self.model_info(model)
        if not inputs:
            raise InvalidInput("input must be a non-empty list of texts or of token-id lists")
        tokens = sum(len(x.split()) + 2 if isinstance(x, str) else len(x) for x in inputs)
        return EmbedResult(np.stack([fake_vector(x) for x in inputs]), tokens)

    def classify(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> ClassifyResult:
        self.model_info(model)
        raise InvalidInput(f"model {model!r} has no classification head")

    async def aembed(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> EmbedResult:
        return self.embed(model, inputs, options)

    async def aclassify(self, model: str, inputs, options: InferenceOptions = InferenceOptions()):
        return self.classify(model, inputs, options)
