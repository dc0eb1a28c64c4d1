"""A deterministic stand-in for ``ptmserve.engine.engine.Engine`` with the same public API.

Used where a test needs control the real engine does not give (an exact in-flight count, a gate that
holds requests, a bug that raises): embeddings are a pure function of the input, so results can be
checked exactly. The real engine is exercised by the integration tests in ``test_*_real.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

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
from ptmserve.errors import DeadlineExceeded, InvalidInput, ModelNotFound, NotReady, Overloaded

DIM = 8
LABELS = ("neg", "pos", "neutral")


def fake_vector(item: str | list[int], dim: int = DIM) -> np.ndarray:
    """The embedding the fake engine returns for one input."""
    key = item.encode() if isinstance(item, str) else np.asarray(item, np.int64).tobytes()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEngine:
    """Two models: ``emb`` (embedding) and ``cls`` (classifier); optional gate and queue bound."""

    def __init__(self, model_control: str = "auto", max_in_flight: int = 1000) -> None:
        self.metrics = EngineMetrics()
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self.gate: asyncio.Event | None = None  # when set, requests wait on it (created per loop)
        self.hold = False
        self.delay = 0.0  # seconds each request takes
        self.closed = False
        self.explicit = model_control == "explicit"
        self._lock = threading.Lock()
        self._loaded = {"emb", "cls"} if not self.explicit else set()
        self._infos = {
            "emb": ModelInfo("emb", ModelKind.EMBEDDING, DIM, (), 16, 100, "float32", 1000, ModelState.READY),
            "cls": ModelInfo(
                "cls", ModelKind.CLASSIFIER, DIM, LABELS, 16, 100, "float32", 1200, ModelState.READY
            ),
        }

    # -------------------------------------------------------------------------------- models

    def models(self) -> list[ModelInfo]:
        return [self.model_info(n) for n in self._infos]

    def model_info(self, name: str) -> ModelInfo:
        if name not in self._infos:
            raise ModelNotFound(f"no model named {name!r}")
        info = self._infos[name]
        if self.explicit and name not in self._loaded:
            return _replace_state(info, ModelState.UNAVAILABLE, "not loaded")
        return info

    def load(self, name: str) -> None:
        self.model_info(name)
        with self._lock:
            self._loaded.add(name)
        self.metrics.loads.labels(name).inc()

    def unload(self, name: str) -> None:
        self.model_info(name)
        with self._lock:
            self._loaded.discard(name)

    def ready(self) -> bool:
        return not self.closed

    def tiers(self) -> list[TierUsage]:
        return [TierUsage("host", 2200, 10_000, {"emb": 1000, "cls": 1200})]

    def close(self, drain_seconds: float = 30.0) -> None:
        deadline = time.monotonic() + drain_seconds
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self.closed = True

    # ---------------------------------------------------------------------------------- work

    def embed(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> EmbedResult:
        inputs = self._check(model, inputs)
        return EmbedResult(np.stack([fake_vector(x) for x in inputs]), _tokens(inputs))

    def classify(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> ClassifyResult:
        inputs = self._check(model, inputs)
        if not self._infos[model].labels:
            raise InvalidInput(f"model {model!r} has no classification head")
        logits = np.stack([fake_vector(x, len(LABELS)) for x in inputs])
        return ClassifyResult(logits, [LABELS[i] for i in logits.argmax(1)], _tokens(inputs))

    async def aembed(self, model: str, inputs, options: InferenceOptions = InferenceOptions()) -> EmbedResult:
        return await self._run(model, inputs, options, self.embed)

    async def aclassify(self, model: str, inputs, options: InferenceOptions = InferenceOptions()):
        return await self._run(model, inputs, options, self.classify)

    async def _run(self, model, inputs, options, fn):
        self._check(model, inputs)  # raise before queueing, as the real engine does
        if options.timeout_us is not None and options.timeout_us < 1000:
            self.metrics.requests.labels(model, "timeout").inc()
            raise DeadlineExceeded(f"deadline of {options.timeout_us} us passed before the request could run")
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.metrics.requests.labels(model, "rejected").inc()
                raise Overloaded(f"queue full ({self.max_in_flight} requests in flight)")
            self.in_flight += 1
        try:
            while self.hold:
                await asyncio.sleep(0.005)
            if self.delay:
                await asyncio.sleep(self.delay)
            result = fn(model, inputs, options)
            self.completed += 1
            self.metrics.requests.labels(model, "success").inc()
            return result
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            with self._lock:
                self.in_flight -= 1

    def _check(self, model: str, inputs):
        """The real engine's validation (same messages); token lists truncated at max_tokens."""
        info = self.model_info(model)
        if self.closed:
            raise NotReady("engine is closed")
        if info.state is ModelState.UNAVAILABLE:
            raise NotReady(f"model {model!r} is not loaded")
        if not inputs:
            raise InvalidInput("input must be a non-empty list of texts or of token-id lists")
        out = []
        for i, x in enumerate(inputs):
            if x == "boom":
                raise RuntimeError("a bug in the engine")  # lets tests check the 500 path
            if isinstance(x, str):
                if not x:
                    raise InvalidInput(f"input[{i}] is an empty string")
                out.append(x)
                continue
            if not x:
                raise InvalidInput(f"input[{i}] must be a non-empty text or a non-empty list of token ids")
            bad = [t for t in x if not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidInput(f"input[{i}] holds {bad[0]!r}, not a token id in [0, {info.vocab_size})")
            out.append(list(x)[: info.max_tokens])
        return out


def _tokens(inputs) -> int:
    return sum(len(x.split()) + 2 if isinstance(x, str) else len(x) for x in inputs)


def _replace_state(info: ModelInfo, state: ModelState, reason: str) -> ModelInfo:
    import dataclasses

    return dataclasses.replace(info, state=state, reason=reason)
