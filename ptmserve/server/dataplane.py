"""Protocol-neutral calls shared by the KServe and OpenAI routes: limits, model names, cancellation.

The routes parse their protocol into plain Python (texts or token id lists, ``InferenceOptions``), call
``DataPlane``, and format the result back. Everything that must behave the same for both protocols lives
here: request limits, the truncate-or-reject policy, cancelling work whose client went away, and the
per-model statistics the KServe statistics extension reports (from the engine's own counters).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
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
from ptmserve.protocol.schedule import schedule_value
from ptmserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Inputs = list[str] | list[list[int]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# Letters, digits, '.', '_', '-'; starts with a letter or digit (so never '.' or '..'); no '/'.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_VERSION = "1"  # a model has one version; "/versions/1" names it explicitly
# Longer timeouts (the protocol allows up to 2**64 - 1 µs) are passed on as this one, about 31 years:
# the same in practice, and within what the engine's timers (threading.TIMEOUT_MAX seconds) can wait.
LONGEST_TIMEOUT_US = 10**15


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
    def unready_reason(self) -> str | None: ...
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

    def ready_model_info(self, name: str, version: str | None = None) -> ModelInfo:
        """``model_info`` of a model that can take requests now; ``NotReady`` (503) otherwise."""
        info = self.model_info(name, version)
        if self.draining:
            raise NotReady("the server is shutting down")
        if info.state is ModelState.UNAVAILABLE:
            raise NotReady(f"model {name!r} is not ready" + (f": {info.reason}" if info.reason else ""))
        return info

    def ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the server cannot take requests now (the readiness probe says it), or None."""
        if self.draining:
            return "the server is shutting down"
        return self.engine.unready_reason()

    async def load(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.load, name)

    async def unload(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.unload, name)

    # -------------------------------------------------------------------------------------- infer

    def check_count(self, n: int) -> None:
        """``PayloadTooLarge`` (413) when one request carries more than ``max_batch_inputs`` inputs."""
        limit = self.settings.max_batch_inputs
        if n > limit:
            raise PayloadTooLarge(f"{n} inputs in one request; the limit is {limit}")

    def check_length(self, i: int, n: int, what: str) -> None:
        """``PayloadTooLarge`` (413) when input ``i`` has more than ``max_input_length`` ``what``."""
        limit = self.settings.max_input_length
        if n > limit:
            raise PayloadTooLarge(f"input {i} has {n} {what}; the limit is {limit}")

    def check_inputs(self, inputs: Inputs) -> Inputs:
        """Apply the request limits (count, length of each input) and refuse text that is not Unicode
        (a lone surrogate, which JSON can spell as ``\\ud800``); the engine validates the rest."""
        self.check_count(len(inputs))
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                self.check_length(i, len(item), "characters")
                _check_unicode(i, item)
            else:
                self.check_length(i, len(item), "token ids")
        return inputs

    def options(self, priority: int = 0, timeout_us: int | None = None) -> InferenceOptions:
        """Engine options from the schedule parameters (each checked by ``schedule_value``)."""
        priority = schedule_value("priority", priority)
        timeout = schedule_value("timeout", 0 if timeout_us is None else timeout_us)
        timeout = min(timeout, LONGEST_TIMEOUT_US)
        return InferenceOptions(priority=priority, timeout_us=timeout or None)

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
        """Logits, labels and embeddings of ``inputs`` from one forward pass; ``InvalidInput`` for a model
        without a classification head."""
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
                st.last_inference_ms = int(time.time() * 1000)
            else:
                st.fail_count += 1
                st.fail_ns += ns

    def statistics(self, names: list[str]) -> dict[str, Any]:
        """Triton's statistics extension body for ``names``.

        ``success``, ``fail``, ``inference_count`` and ``last_inference`` are this server's inference
        requests (both protocols; ``ns`` from arrival to answer). ``queue``, ``compute_infer``,
        ``execution_count`` and ``batch_stats`` come from the engine's counters, which see every request
        of the model (HTTP or Python API): ``queue`` per request, from its arrival in the engine to the
        start of its batch; ``compute_infer`` per batch (one model execution), as the engine times
        batches. Input and output copies are inside ``compute_infer``, so ``compute_input`` and
        ``compute_output`` stay zero. ``batch_stats`` has one entry per bucket of the engine's batch-size
        histogram that saw batches: ``batch_size`` is the bucket's upper bound (1, 2, 4, ... requests) and
        ``compute_infer.count`` its batches; the engine does not time batches by size, so their ``ns`` is 0.
        """
        with self._stats_lock:
            snap = {n: dataclasses.replace(self._stats.get(n, _Stats())) for n in names}
        zero = {"count": 0, "ns": 0}
        out = []
        for n, st in snap.items():
            engine = engine_model_stats(self.engine.metrics, n)
            out.append(
                {
                    "name": n,
                    "version": MODEL_VERSION,
                    "last_inference": st.last_inference_ms,
                    "inference_count": st.inference_count,
                    "execution_count": engine.batches,
                    "inference_stats": {
                        "success": {"count": st.success_count, "ns": st.success_ns},
                        "fail": {"count": st.fail_count, "ns": st.fail_ns},
                        "queue": {"count": engine.queued, "ns": engine.queue_ns},
                        "compute_input": zero,
                        "compute_infer": {"count": engine.batches, "ns": engine.compute_ns},
                        "compute_output": zero,
                    },
                    "batch_stats": [
                        {
                            "batch_size": size,
                            "compute_input": zero,
                            "compute_infer": {"count": count, "ns": 0},
                            "compute_output": zero,
                        }
                        for size, count in engine.batch_sizes
                    ],
                }
            )
        return {"model_stats": out}


@dataclass(frozen=True, slots=True)
class EngineModelStats:
    """One model's figures read from the engine's Prometheus counters."""

    queued: int  # requests that left the queue for a batch
    queue_ns: int  # their total time in the queue
    batches: int  # batches executed
    compute_ns: int  # their total compute time
    batch_sizes: list[tuple[int, int]]  # (bucket upper bound in requests, batches in that bucket)


def engine_model_stats(metrics: Any, model: str) -> EngineModelStats:
    """Read ``model``'s queue, compute and batch-size histograms from an ``EngineMetrics``."""
    queued, queue_s, _ = _histogram(metrics.queue_seconds, model)
    batches, compute_s, buckets = _histogram(metrics.compute_seconds, model)
    _, _, size_buckets = _histogram(metrics.batch_size, model)
    sizes: list[tuple[int, int]] = []
    below = 0
    for bound, cumulative in size_buckets:  # cumulative counts, ascending bounds
        if cumulative > below and math.isfinite(bound):
            sizes.append((int(bound), cumulative - below))
        below = cumulative
    return EngineModelStats(queued, round(queue_s * 1e9), batches, round(compute_s * 1e9), sizes)


def _histogram(hist: Any, model: str) -> tuple[int, float, list[tuple[float, int]]]:
    """(count, sum, cumulative buckets) of one model's child of a labelled Prometheus histogram."""
    count, total, buckets = 0, 0.0, []
    for family in hist.collect():
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), int(sample.value)))
    buckets.sort()
    return count, total, buckets


def _check_unicode(i: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"input {i} is not valid Unicode: a lone surrogate at character {exc.start} "
            "(JSON \\u escapes of surrogates must come in high-low pairs)"
        ) from None


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
