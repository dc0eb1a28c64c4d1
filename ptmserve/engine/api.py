"""The records that cross the engine boundary: what the server and the Python API see.

No torch here: results are numpy arrays, so the server layer never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ptmserve.errors import InvalidInput


class ModelKind(str, Enum):
    EMBEDDING = "embedding"  # returns pooled (and maybe normalised) embeddings
    CLASSIFIER = "classifier"  # also has a sequence-classification head: logits and labels
    GENERATOR = "generator"  # a text generation model (GPT-2, LLaMA): completions and chat


class ModelState(str, Enum):
    READY = "READY"  # can serve now (it may still need a switch, which is transparent)
    LOADING = "LOADING"  # an explicit load is in progress
    UNAVAILABLE = "UNAVAILABLE"  # unloaded under explicit control, or its last load failed


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    kind: ModelKind
    dim: int  # embedding width (hidden size)
    labels: tuple[str, ...]  # class names, empty for embedding-only models
    max_tokens: int  # inputs longer than this are truncated
    vocab_size: int  # token ids must be below this
    dtype: str  # dtype the model computes in, e.g. "bfloat16"
    stored_bytes: int  # bytes of its weights in the repository
    state: ModelState
    reason: str = ""  # why it is UNAVAILABLE, when it is
    exits: tuple[int, ...] = ()  # layers (0-based) after which it has an early exit; () for most models


@dataclass(frozen=True, slots=True)
class InferenceOptions:
    """Per-request scheduling hints, with Triton's schedule-policy semantics, and how to classify."""

    priority: int = 0  # 0 = the model's default class, 1 = highest (real-time), >= 2 batch
    timeout_us: int | None = None  # the request must complete within this, or fail as a timeout
    early_exit: bool = True  # a model with early exits may answer an input at an exit; False: full depth

    def __post_init__(self) -> None:
        if not isinstance(self.early_exit, bool):
            raise InvalidInput(f"early_exit must be true or false, got {str(self.early_exit)[:40]!r}")


@dataclass(slots=True)
class EmbedResult:
    embeddings: np.ndarray  # (B, D) float32
    prompt_tokens: int  # tokens actually computed, after truncation


@dataclass(slots=True)
class ClassifyResult:
    logits: np.ndarray  # (B, C) float32
    labels: list[str]  # argmax label per input
    prompt_tokens: int
    embeddings: np.ndarray | None = None  # (B, D) float32 pooled embeddings, from the same forward pass
    # (B,) int32, models with early exits only (else None): the last layer (0-based) each input computed,
    # num_layers - 1 for the final classifier; an input that left early has its embedding at that layer
    exit_layers: np.ndarray | None = None


@dataclass(slots=True)
class TierUsage:
    name: str  # "host" or "device"
    used_bytes: int
    budget_bytes: int
    per_model: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- generation


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How one generation request samples and when it stops (OpenAI's parameters)."""

    max_tokens: int | None = None  # new tokens at most; None: until the context (or the KV cache) is full
    # None: the model's own default (its generation settings), else 1.0, 1.0 and 0 (OpenAI's)
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0: no top-k filter
    seed: int | None = None  # the same seed and prompt give the same tokens, whatever shares the batch
    stop: tuple[str, ...] = ()  # the text ends before the first of these (not included)
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise InvalidInput(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if len(self.stop) > 16 or any(not isinstance(s, str) for s in self.stop):
            raise InvalidInput("stop must be at most 16 strings")


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """New output of one step: text that is final (a possible stop-string prefix is held back)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The whole output of a finished generation request."""

    text: str  # everything generated (without the stop string or the end-of-sequence token)
    token_ids: tuple[int, ...]  # every generated token (the end-of-sequence token included, if sampled)
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length" (max_tokens or context)
    prompt_tokens: int  # after truncation
    completion_tokens: int
    first_token_seconds: float  # time from submission to the first token


class Generation:
    """A generation request in flight: iterate it (``for`` or ``async for``) for its chunks as they are
    made, or wait for ``result()``. ``cancel()`` (or cancelling an awaiting task) ends it and frees its
    KV cache blocks at the next step boundary.

    The engine's step loop calls ``push`` and then finishes ``future``; the two are safe to call from any
    thread.
    """

    def __init__(self, prompt_tokens: int, on_cancel: Callable[[], None] = lambda: None) -> None:
        self.prompt_tokens = prompt_tokens
        self.future: Future[GenerationResult] = Future()
        self._chunks: deque[GenerationChunk] = deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.future.add_done_callback(lambda _f: self._wake())

    # -- the producer (the engine) --------------------------------------------------------------------

    def push(self, chunk: GenerationChunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, event in wakers:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its consumer is gone
                loop.call_soon_threadsafe(event.set)

    # -- consumers ------------------------------------------------------------------------------------

    def cancel(self) -> bool:
        """End the request now (its client went away). Returns False when it had finished already."""
        return self.future.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the whole output. Raises the request's error (``DeadlineExceeded``, ``NotReady`` ...)."""
        return self.future.result(timeout)

    async def aresult(self) -> GenerationResult:
        """``result`` for asyncio; cancelling the awaiting task cancels the request."""
        try:
            return await asyncio.wrap_future(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def _next(self) -> GenerationChunk | None:
        """The next chunk, or None at the end (raising the request's error if it failed)."""
        with self._cond:
            if self._chunks:
                return self._chunks.popleft()
        if self.future.done():
            with self._cond:
                if self._chunks:  # pushed between the two looks
                    return self._chunks.popleft()
            if self.future.cancelled():
                raise CancelledError()
            self.future.result()  # raises its error, if any
            return None
        raise _NotYet

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._chunks) or self.future.done())
            chunk = self._next()
            if chunk is None:
                return
            yield chunk

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waker = (loop, event)
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                event.clear()
                try:
                    chunk = self._next()
                except _NotYet:
                    await event.wait()
                    continue
                if chunk is None:
                    return
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            raise
        finally:
            with self._cond:
                self._wakers.remove(waker)


class _NotYet(Exception):
    """No chunk is ready and the request is still running."""
