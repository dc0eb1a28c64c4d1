"""The step loop: one thread that owns the scheduler and the weight manager.

Callers never touch either: they post messages to the worker's inbox and wait on futures.
``step()`` is: schedule, run, post-process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ptmserve.engine.api import ClassifyResult, EmbedResult
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.metrics import EngineMetrics
from ptmserve.engine.requests import Outcome, Request
from ptmserve.engine.scheduler import Scheduler, Step
from ptmserve.errors import DeadlineExceeded, InvalidInput, Overloaded, PtmError
from ptmserve.memory.manager import WeightManager
from ptmserve.memory.records import MemoryEvent
from ptmserve.models.packed import pack

logger = logging.getLogger(__name__)

_MAX_IDLE_S = 0.1  # an idle worker re-checks at least this often (a load it waits on may end silently)


@dataclass(slots=True)
class Work:
    """What the engine keeps in ``Request.payload``: the inputs and where the answer goes."""

    token_ids: list[list[int]]
    classify: bool
    future: Future = field(default_factory=Future)


@dataclass(slots=True)
class _Control:
    """Run ``fn`` on the worker thread (load, unload) and answer through ``future``."""

    fn: Callable[[], object]
    future: Future = field(default_factory=Future)


class _Stop:
    pass


@dataclass(slots=True)
class _LoadDone:
    """A background load ended (heard on a loader thread, handed to the scheduler on the worker)."""

    event: MemoryEvent


class _Tiers:
    """The scheduler's ``TierView`` over the weight manager, taken once per ``schedule``."""

    def __init__(self, weights: WeightManager, catalog: ModelCatalog, busy: set[str]) -> None:
        self._weights = weights
        self._catalog = catalog
        stats = weights.stats()
        names = set(stats.device.per_model) | set(stats.host.per_model)  # every model holding bytes
        where = {m: weights.residency(m) for m in names}
        self.resident = frozenset(m for m, r in where.items() if r.on_device)
        self.loading = frozenset(m for m, r in where.items() if r.loading)
        self.host = frozenset(m for m, r in where.items() if r.on_host)
        self.busy = frozenset(busy)
        self.device_budget = stats.device.budget_bytes
        self.device_free = stats.device.budget_bytes - stats.device.used_bytes + stats.device.free_list_bytes

    def model_bytes(self, model: str) -> int:
        return self._catalog.device_bytes(model)


class Worker:
    """Runs the scheduler's steps on the real tiers and models, on one thread of its own."""

    def __init__(
        self,
        scheduler: Scheduler,
        weights: WeightManager,
        catalog: ModelCatalog,
        metrics: EngineMetrics,
        device: torch.device,
    ) -> None:
        self._scheduler = scheduler
        self._weights = weights
        self._catalog = catalog
        self._metrics = metrics
        self._device = device
        self._inbox: queue.SimpleQueue[Request | _Control | _LoadDone | _Stop] = queue.SimpleQueue()
        self._busy: set[str] = set()
        self._published: dict[str, set[str]] = {}  # tier -> models whose resident bytes /metrics shows
        self._stopping = False
        weights.add_listener(self._on_memory_event)
        self._thread = threading.Thread(target=self._loop, name="ptmserve-worker", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self._inbox.put(request)

    def control(self, fn: Callable[[], object]) -> Future:
        message = _Control(fn)
        self._inbox.put(message)
        return message.future

    def stop(self, timeout: float) -> bool:
        """Finish every queued request, then stop. Returns False if that took longer than ``timeout``."""
        self._inbox.put(_Stop())
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        idle = False  # the last schedule ran nothing: wait for news instead of asking again at once
        while True:
            self._receive(wait=idle)
            if self._stopping and not self._scheduler.pending():
                return
            step = self._scheduler.schedule(_Tiers(self._weights, self._catalog, self._busy))
            idle = step is None or (step.model is None and not step.expired)
            if step is None:
                continue
            try:
                self._run(step)
            except Exception:  # a bug: answer the batch, keep serving
                logger.exception("step %d on %s failed", step.seq, step.model)
                for r in step.batch:
                    self._fail(r, PtmError("internal error"), Outcome.ERROR)
                self._scheduler.on_step_done(step, 0.0, ok=False)

    def _receive(self, *, wait: bool) -> None:
        """Take every message waiting. With ``wait``, first block until a message arrives (a request, a
        load ending) or until the scheduler wants to be asked again (``wake_at``)."""
        timeout: float | None = 0.0
        if wait:
            wake = self._scheduler.wake_at()
            timeout = None if wake is None else min(_MAX_IDLE_S, max(0.0, wake - self._scheduler.clock()))
        while True:
            try:
                message = self._inbox.get(timeout=timeout) if timeout != 0.0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            self._handle(message)

    def _handle(self, message: Request | _Control | _LoadDone | _Stop) -> None:
        if isinstance(message, _Stop):
            self._stopping = True
        elif isinstance(message, _LoadDone):
            e = message.event
            self._scheduler.on_load_done(e.model, e.seconds, e.nbytes, ok=e.kind == "load")
        elif isinstance(message, _Control):
            try:
                message.future.set_result(message.fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                message.future.set_exception(exc)
        else:
            try:
                self._scheduler.register(message.model, self._catalog.device_bytes(message.model))
                self._scheduler.submit(message)
            except DeadlineExceeded as exc:
                self._fail(message, exc, Outcome.TIMEOUT)
            except (Overloaded, InvalidInput) as exc:
                self._fail(message, exc, Outcome.REJECTED)
            except PtmError as exc:  # e.g. the model was removed from the repository meanwhile
                self._fail(message, exc, Outcome.ERROR)

    def _run(self, step: Step) -> None:
        for r in step.expired:
            self._fail(
                r, DeadlineExceeded(f"request for {r.model!r} could not finish in time"), Outcome.TIMEOUT
            )
        if step.model is None:  # nothing can run now (work gathering, or waiting on a load)
            self._scheduler.on_step_done(step, 0.0)
            return
        for m in step.evict:
            self._weights.evict(m)
        batch = [r for r in step.batch if r.payload.future.set_running_or_notify_cancel()]
        for r in step.batch:
            if r.payload.future.cancelled():  # the client went away while it was queued
                self._metrics.requests.labels(r.model, Outcome.ERROR.value).inc()
        if not batch:
            self._start_prefetch(step.prefetch)
            self._scheduler.on_step_done(step, 0.0)
            return
        self._execute(step, batch)

    def _execute(self, step: Step, batch: list[Request]) -> None:
        model = step.model
        assert model is not None
        started = self._scheduler.clock()
        for r in batch:
            self._metrics.queue_seconds.labels(model).observe(started - r.arrival)
        self._busy.add(model)
        try:
            entry = self._catalog.entry(model)
            inputs = [ids for r in batch for ids in r.payload.token_ids]
            classify = any(r.payload.classify for r in batch)
            packed = pack(inputs, position_offset=entry.config.position_offset, device=self._device)
            t0 = time.perf_counter()
            with self._weights.acquire(model) as loaded:
                self._start_prefetch(step.prefetch)  # queued behind this step's own load
                out = loaded.run(packed, classify=classify)
                embeddings = out.embeddings.float().cpu().numpy()
                logits = out.logits.float().cpu().numpy() if out.logits is not None else None
            seconds = time.perf_counter() - t0
        except PtmError as exc:
            for r in batch:
                self._fail(r, exc, Outcome.ERROR)
            self._scheduler.on_step_done(step, 0.0, ok=False)
            return
        finally:
            self._busy.discard(model)
        self._publish_tiers()
        self._metrics.compute_seconds.labels(model).observe(seconds)
        self._metrics.batch_size.labels(model).observe(len(batch))
        self._metrics.batch_tokens.labels(model).inc(step.tokens)
        self._scheduler.on_step_done(step, seconds)
        self._deliver(batch, embeddings, logits, entry.config.labels)

    def _deliver(
        self, batch: list[Request], embeddings: np.ndarray, logits: np.ndarray | None, labels: tuple[str, ...]
    ) -> None:
        now = self._scheduler.clock()
        start = 0
        for r in batch:
            work: Work = r.payload  # type: ignore[assignment]
            n = len(work.token_ids)
            rows = slice(start, start + n)
            start += n
            if now > r.deadline:
                late = DeadlineExceeded(f"request for {r.model!r} finished after its deadline")
                self._fail(r, late, Outcome.TIMEOUT)
                continue
            if work.classify and logits is not None:
                part = logits[rows]
                result: object = ClassifyResult(
                    part, [labels[i] for i in part.argmax(axis=1)], r.tokens, embeddings[rows]
                )
            else:
                result = EmbedResult(embeddings[rows], r.tokens)
            work.future.set_result(result)
            self._metrics.requests.labels(r.model, Outcome.SUCCESS.value).inc()

    def _publish_tiers(self) -> None:
        """Resident bytes per tier and per model, for ``/metrics``."""
        stats = self._weights.stats()
        for tier in (stats.host, stats.device):
            self._metrics.resident_bytes.labels(tier.name).set(tier.used_bytes)
            gone = self._published.get(tier.name, set()) - set(tier.per_model)
            for model in gone:
                self._metrics.model_resident_bytes.labels(model, tier.name).set(0)
            for model, nbytes in tier.per_model.items():
                self._metrics.model_resident_bytes.labels(model, tier.name).set(nbytes)
            self._published[tier.name] = set(tier.per_model)

    def _start_prefetch(self, models: list[str]) -> None:
        for m in models:
            try:
                self._weights.prefetch(m)
            except PtmError as exc:
                logger.warning("prefetch of %s skipped: %s", m, exc.message)

    def _fail(self, r: Request, exc: PtmError, outcome: Outcome) -> None:
        future: Future = r.payload.future  # type: ignore[union-attr]
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(exc)
        self._metrics.requests.labels(r.model, outcome.value).inc()

    def _on_memory_event(self, event: MemoryEvent) -> None:
        """Runs on loader threads: only counters here."""
        m = self._metrics
        if event.kind == "load":
            m.loaded_bytes.labels(event.model, event.tier).inc(event.nbytes)
            if event.tier == "device":
                m.loads.labels(event.model).inc()
                m.load_seconds.labels(event.model).inc(event.seconds)
        elif event.kind == "evict":
            m.evictions.labels(event.model, event.tier).inc()
        elif event.kind == "load_failed":
            logger.warning("loading %s into the %s tier failed: %s", event.model, event.tier, event.error)
        if event.kind != "evict" and event.tier == "device":
            self._inbox.put(_LoadDone(event))
