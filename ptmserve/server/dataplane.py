"""Protocol-neutral calls shared by the KServe and OpenAI routes: limits, model names, cancellation.

The routes parse their protocol into plain Python (texts or token id lists, ``InferenceOptions``), call
``DataPlane``, and format the result back. Everything that must behave the same for both protocols lives
here: request limits, the truncate-or-reject policy, cancelling work whose client went away, and the
per-model statistics the KServe statistics extension reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    InferenceOptions,
    ModelInfo,
    ModelState,
    TierUsage,
)
from ptmserve.errors import InvalidInput, ModelNotFound, NotReady, PayloadTooLarge
from ptmserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Inputs = list[str] | list[list[int]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# Letters, digits, '.', '_', '-'; starts with a letter or digit (so never '.' or '..'); no '/'.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_VERSION = "1"  # a model has one version; "/versions/1" names it explicitly


class EngineLike(Protocol):
    """What the HTTP layer needs from ``ptmserve.engine.engine.Engine`` (see docs/architecture.md)."""

    metrics: Any

    def models(self) -> list[ModelInfo]: ...
    def model_info(self, name: str) -> ModelInfo: ...
    async def aembed(self, model: str, inputs: Inputs, options: InferenceOptions = ...) -> EmbedResult: ...
    async def aclassify(
        self, model: str, inputs: Inputs, options: InferenceOptions = ...
    ) -> ClassifyResult: ...
    def load(self, name: str) -> None: ...
    def unload(self, name: str) -> None: ...
    def ready(self) -> bool: ...
    def tiers(self) -> list[TierUsage]: ...
    def close(self, drain_seconds: float = 30.0) -> None: ...


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; its work was cancelled."""


@dataclass(slots=True)
class _Stats:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # inputs served (Triton counts batch elements)
    execution_count: int = 0  # requests served
    last_inference_ms: int = 0


class DataPlane:
    """Validated, cancellable engine calls for one app."""

    def __init__(self, engine: EngineLike, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False  # set on SIGTERM: readiness answers 503 from then on
        self._stats: dict[str, _Stats] = {}
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------------------------- models

    def check_name(self, name: str, version: str | None = None) -> str:
        """``name`` if it is a well-formed model name (and ``version`` is ours), else a 4xx error."""
        if not MODEL_NAME.fullmatch(name):
            raise InvalidInput(f"invalid model name {name[:140]!r}: use letters, digits, '.', '_', '-'")
        if version is not None and version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version[:40]!r} (only {MODEL_VERSION!r})")
        return name

    def model_info(self, name: str, version: str | None = None) -> ModelInfo:
        """The engine's description of ``name``; ``ModelNotFound`` (404) when there is none."""
        return self.engine.model_info(self.check_name(name, version))

    def servable(self, name: str, version: str | None = None) -> ModelInfo:
        """``model_info`` of a model that can take requests now; ``NotReady`` (503) otherwise."""
        info = self.model_info(name, version)
        if self.draining:
            raise NotReady("the server is shutting down")
        if info.state is ModelState.UNAVAILABLE:
            raise NotReady(f"model {name!r} is not ready" + (f": {info.reason}" if info.reason else ""))
        return info

    def ready(self) -> bool:
        return not self.draining and self.engine.ready()

    async def load(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.load, name)

    async def unload(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.unload, name)

    # -------------------------------------------------------------------------------------- infer

    def check_inputs(self, inputs: Inputs) -> Inputs:
        """Apply the request limits (count, length of each input); the engine validates the rest."""
        s = self.settings
        if len(inputs) > s.max_batch_inputs:
            raise PayloadTooLarge(f"{len(inputs)} inputs in one request; the limit is {s.max_batch_inputs}")
        for i, item in enumerate(inputs):
            if len(item) > s.max_input_length:
                what = "characters" if isinstance(item, str) else "token ids"
                raise PayloadTooLarge(f"input {i} has {len(item)} {what}; the limit is {s.max_input_length}")
        return inputs

    def options(self, priority: int = 0, timeout_us: int | None = None) -> InferenceOptions:
        return InferenceOptions(priority=priority, timeout_us=timeout_us or None)

    async def embed(
        self, info: ModelInfo, inputs: Inputs, options: InferenceOptions, receive: Receive | None
    ) -> EmbedResult:
        """Embeddings of ``inputs``; the work is cancelled if the client disconnects first."""
        inputs = self.check_inputs(inputs)
        return await self._timed(
            info.name, len(inputs), self.engine.aembed(info.name, inputs, options), receive
        )

    async def classify(
        self, info: ModelInfo, inputs: Inputs, options: InferenceOptions, receive: Receive | None
    ) -> ClassifyResult:
        """Logits and labels of ``inputs``; ``InvalidInput`` for a model without a classification head."""
        if not info.labels:
            raise InvalidInput(f"model {info.name!r} has no classification head (no LOGITS or LABEL)")
        inputs = self.check_inputs(inputs)
        work = self.engine.aclassify(info.name, inputs, options)
        return await self._timed(info.name, len(inputs), work, receive)

    async def _timed(self, model: str, n: int, work: Coroutine[Any, Any, T], receive: Receive | None) -> T:
        start = time.perf_counter_ns()
        ok = False
        try:
            result = await until_disconnect(work, receive)
            ok = True
            return result
        finally:
            self._record(model, n, ok, time.perf_counter_ns() - start)

    # -------------------------------------------------------------------------------------- stats

    def _record(self, model: str, n: int, ok: bool, ns: int) -> None:
        with self._stats_lock:
            st = self._stats.setdefault(model, _Stats())
            if ok:
                st.success_count += 1
                st.success_ns += ns
                st.inference_count += n
                st.execution_count += 1
                st.last_inference_ms = int(time.time() * 1000)
            else:
                st.fail_count += 1
                st.fail_ns += ns

    def statistics(self, names: list[str]) -> dict[str, Any]:
        """Triton's statistics extension body for ``names``."""
        with self._stats_lock:
            snap = {n: dataclasses.replace(self._stats.get(n, _Stats())) for n in names}
        zero = {"count": 0, "ns": 0}
        return {
            "model_stats": [
                {
                    "name": n,
                    "version": MODEL_VERSION,
                    "last_inference": st.last_inference_ms,
                    "inference_count": st.inference_count,
                    "execution_count": st.execution_count,
                    "inference_stats": {
                        "success": {"count": st.success_count, "ns": st.success_ns},
                        "fail": {"count": st.fail_count, "ns": st.fail_ns},
                        "queue": zero,
                        "compute_input": zero,
                        "compute_infer": zero,
                        "compute_output": zero,
                    },
                    "batch_stats": [],
                }
                for n, st in snap.items()
            ]
        }


async def until_disconnect(work: Coroutine[Any, Any, T], receive: Receive | None) -> T:
    """Await ``work``, cancelling it (and raising ``ClientDisconnected``) if the client goes away first.

    ``receive`` is the ASGI receive of a request whose body was already read: its next message is
    ``http.disconnect`` when the connection closes.
    """
    task = asyncio.ensure_future(work)
    if receive is None:
        return await task
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    logger.info("client disconnected; its queued work was cancelled")
    raise ClientDisconnected()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
