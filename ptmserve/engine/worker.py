"""The step loop: schedule, execute, deliver, on one supervised thread, with admission, cancellation and
deadlines decided at once on other threads.

Threads and what each may do:

- callers (any thread): ``admit`` a request (a full queue or a passed deadline is refused at once) and
  ``cancel`` one (its queue slot is free at once); both hold the scheduler's lock for microseconds;
- the deadline timer: sleeps until the earliest queued deadline and fails what expired, whatever runs;
- the worker: ``schedule`` under the lock, ``runner.execute`` without it, then report and deliver;
- loader threads: only post load events (the worker hands them to the scheduler).

No error ends the loop: a failing step fails its own requests; a failing ``schedule`` fails what was
queued. Should the loop itself crash, it is restarted; after ``_MAX_CRASHES`` crashes within a minute
it stays down and ``failure`` says why (the engine then reports not ready).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from ptmserve.engine.api import ClassifyResult, EmbedResult
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.costs import Tier
from ptmserve.engine.generation import GenerationUpdate
from ptmserve.engine.metrics import EngineMetrics
from ptmserve.engine.requests import Outcome, Request, RequestStatus
from ptmserve.engine.runner import ModelRunner, RunnerOutput, future_of, work_of
from ptmserve.engine.scheduler import Scheduler, Step
from ptmserve.errors import DeadlineExceeded, NotReady, PtmError
from ptmserve.memory.allocator import HeapTrimmer
from ptmserve.memory.manager import WeightManager
from ptmserve.memory.policy import RankedPolicy
from ptmserve.memory.records import MemoryEvent

logger = logging.getLogger(__name__)

_MAX_IDLE_S = 0.1  # an idle worker re-checks at least this often (a load it waits on may end silently)
_MAX_CRASHES = 3  # loop crashes within a minute before the worker stays down
_MAX_TIMER_SLEEP_S = 60.0  # the deadline timer looks again at least this often

Ending = tuple[Request, PtmError, Outcome]  # fail this request with this error, counted as this outcome


@dataclass(slots=True)
class _Control:
    """Run ``fn`` on the worker thread between steps (load, unload) and answer through ``future``."""

    fn: Callable[[], object]
    future: Future = field(default_factory=Future)


class _Tiers:
    """The scheduler's ``TierView`` over the weight manager and the in-memory catalog, taken once per
    ``schedule`` (no disk reads)."""

    def __init__(self, weights: WeightManager, catalog: ModelCatalog) -> None:
        self._catalog = catalog
        stats = weights.stats()
        names = set(stats.device.per_model) | set(stats.host.per_model)  # every model holding bytes
        where = {m: weights.residency(m) for m in names}
        self.resident = frozenset(m for m, r in where.items() if r.on_device)
        self.loading = frozenset(m for m, r in where.items() if r.loading)
        self.host = frozenset(m for m, r in where.items() if r.on_host)
        self.busy: frozenset[str] = frozenset()  # the worker schedules only between steps
        self.device_budget = stats.device.budget_bytes
        self.device_free = stats.device.budget_bytes - stats.device.used_bytes + stats.device.free_list_bytes

    def model_bytes(self, model: str) -> int:
        return self._catalog.device_bytes(model)


class Worker:
    """Runs the scheduler's steps through the runner, on one thread of its own."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        weights: WeightManager,
        catalog: ModelCatalog,
        metrics: EngineMetrics,
        eviction: RankedPolicy | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._eviction = eviction  # the weight manager's policy: it follows each step's eviction order
        self._runner = runner
        self._weights = weights
        self._catalog = catalog
        self._metrics = metrics
        self._lock = threading.Lock()  # guards the scheduler; never held while a step computes
        self._news = threading.Event()  # the worker has something to look at
        self._deadlines_moved = threading.Event()  # the timer should look at the next deadline again
        self._controls: queue.SimpleQueue[_Control] = queue.SimpleQueue()
        self._load_events: queue.SimpleQueue[MemoryEvent] = queue.SimpleQueue()
        self._current: Step | None = None  # the step executing now
        self._timer_wakes_at = 0.0  # when the deadline timer looks next (clock seconds)
        self._published: dict[str, set[str]] = {}  # tier -> models whose resident bytes /metrics shows
        self._preemptions_seen = 0  # of the generation runner's count, already in the metric
        self._heap = HeapTrimmer()  # evictions free buffers of many sizes: hand their pages back
        self._stopping = False
        self._closed = False
        self.failure: str | None = None  # why the loop stopped for good, if it did
        weights.add_listener(self._on_memory_event)
        runner.early_answer = self._answer_early
        self._thread = threading.Thread(target=self._run_forever, name="ptmserve-worker", daemon=True)
        self._timer = threading.Thread(target=self._watch_deadlines, name="ptmserve-deadlines", daemon=True)
        self._thread.start()
        self._timer.start()

    # -- any thread -----------------------------------------------------------------------------------

    def admit(self, req: Request) -> None:
        """Queue ``req`` now. Raises (at once, nothing queued) ``Overloaded``, ``DeadlineExceeded``,
        ``InvalidInput`` or ``NotReady``; the refusal is counted."""
        try:
            with self._lock:
                if self._stopping or self.failure is not None:
                    raise NotReady(self.failure or "the server is shutting down")
                catalog = self._catalog
                self._scheduler.register(
                    req.model, catalog.device_bytes(req.model), catalog.weight_bytes(req.model)
                )
                self._scheduler.submit(req)
        except DeadlineExceeded:
            self._count(req.model, Outcome.TIMEOUT)
            raise
        except PtmError:
            self._count(req.model, Outcome.REJECTED)
            raise
        future_of(req).add_done_callback(lambda f: self._cancelled(req) if f.cancelled() else None)
        self._news.set()
        if req.deadline < self._timer_wakes_at:  # the timer sleeps past this deadline: wake it
            self._deadlines_moved.set()

    def drop(self, model: str, error: PtmError) -> int:
        """Fail every queued request of ``model`` with ``error`` (it was unloaded). Returns how many."""
        with self._lock:
            dropped = self._scheduler.drop(model)
        self._end_all([(r, error, Outcome.ERROR) for r in dropped])
        return len(dropped)

    def control(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the worker thread between steps; its result or error comes through the future."""
        message = _Control(fn)
        self._controls.put(message)
        self._news.set()
        return message.future

    def stop(self, timeout: float) -> bool:
        """Refuse new requests, finish every admitted one, then stop. Returns False if that took longer
        than ``timeout``."""
        with self._lock:
            self._stopping = True
        self._news.set()
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        self._closed = True
        self._deadlines_moved.set()
        return done

    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    # -- the worker thread ----------------------------------------------------------------------------

    def _run_forever(self) -> None:
        crashes: list[float] = []
        while True:
            try:
                self._loop()
                return
            except BaseException as exc:  # noqa: BLE001 - the loop must not die silently
                logger.exception("the step loop crashed")
                self._recover()
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < 60.0] + [now]
                if len(crashes) >= _MAX_CRASHES:
                    self.failure = f"the step loop crashed {len(crashes)} times in a minute: {exc!r}"
                    logger.critical("%s; the engine stops serving", self.failure)
                    with self._lock:
                        dropped = self._scheduler.drop()
                    self._end_all([(r, NotReady(self.failure), Outcome.ERROR) for r in dropped])
                    return
                logger.warning("restarting the step loop")

    def _loop(self) -> None:
        while True:
            self._news.clear()
            self._run_controls()
            if self._runner.generation.reap():  # cancelled or failed sequences: free their blocks now
                self._publish_kv()
            step, endings, stop = self._next_step()
            self._end_all(endings)
            if stop:
                return
            if step is None:
                continue
            self._current = step
            self._publish_start(step)
            output = self._runner.execute(step)
            self._complete(step, output)
            self._current = None
            self._heap.maybe_trim()

    def _run_controls(self) -> None:
        while True:
            try:
                message = self._controls.get_nowait()
            except queue.Empty:
                return
            try:
                message.future.set_result(message.fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                message.future.set_exception(exc)

    def _next_step(self) -> tuple[Step | None, list[Ending], bool]:
        """The next step to execute (None: nothing now, after waiting for news), what to fail, and
        whether to stop."""
        wait: float | None = None
        with self._lock:
            self._absorb_load_events()
            if self._stopping and not self._scheduler.pending():
                return None, [], True
            try:
                step = self._scheduler.schedule(_Tiers(self._weights, self._catalog))
            except Exception:  # a scheduling bug would repeat forever: fail what was queued instead
                logger.exception("scheduling failed; failing the queued requests")
                error = PtmError("internal error while scheduling this request; see the server log")
                return None, [(r, error, Outcome.ERROR) for r in self._scheduler.drop()], False
            endings: list[Ending] = []
            if step is not None and step.model is not None and self._eviction is not None:
                self._eviction.follow(step.eviction_order)
            if step is not None:
                late = DeadlineExceeded("the request could not finish before its deadline")
                endings = [(r, late, Outcome.TIMEOUT) for r in step.expired]
                if step.model is not None:
                    return step, endings, False
                wake = self._scheduler.wake_at()
                now = self._scheduler.clock()
                wait = _MAX_IDLE_S if wake is None else min(_MAX_IDLE_S, max(0.0, wake - now))
        if not endings:
            self._news.wait(wait)
        return None, endings, False

    def _absorb_load_events(self) -> None:
        while True:
            try:
                e = self._load_events.get_nowait()
            except queue.Empty:
                return
            source = Tier.DISK if e.read_bytes else Tier.HOST  # a load that read the repository first
            self._scheduler.on_load_done(e.model, e.seconds, e.nbytes, source, ok=e.kind == "load")

    def _complete(self, step: Step, output: RunnerOutput) -> None:
        """Report ``step`` to the scheduler, keep each request's part, deliver what finished."""
        progress = {request_id: u.pending for request_id, u in output.generated.items()}
        with self._lock:
            if output.error is not None:
                self._scheduler.on_step_done(step, 0.0, ok=False)
                finished: list[Request] = []
            else:
                finished = self._scheduler.on_step_done(
                    step, output.exec_seconds, output.wait_seconds, progress=progress, tokens=output.tokens
                )
        if output.error is not None:
            failed = [r for r in step.batch if r.status is RequestStatus.FAILED]
            self._end_all([(r, output.error, Outcome.ERROR) for r in failed])
            return
        self._publish_step(step, output)
        if output.generated:
            self._stream(step, output.generated)
            return
        for r in step.batch:
            if r.status is RequestStatus.CANCELLED:
                continue
            work = work_of(r)
            work.embeddings.append(output.embeddings[r.id])
            if work.classify:
                work.logits.append(output.logits[r.id])
            if r.id in output.exit_layers:
                work.exit_layers.append(output.exit_layers[r.id])
        for r in finished:
            try:
                self._deliver(r)
            except Exception:  # noqa: BLE001 - e.g. the model vanished meanwhile: answer, do not hang
                logger.exception("delivering request %d of %s failed", r.id, r.model)
                error = PtmError(f"internal error while answering a request for {r.model!r}")
                self._end(r, error, Outcome.ERROR)

    def _stream(self, step: Step, updates: dict[int, GenerationUpdate]) -> None:
        """Hand each sequence of a generation step its new token and text; answer the finished ones."""
        model = step.model
        m = self._metrics
        for r in step.batch:
            update = updates.get(r.id)
            if update is None or update.new_tokens == 0 or r.status is RequestStatus.CANCELLED:
                continue
            m.generated_tokens.labels(model).inc(update.new_tokens)
            if update.first_token_seconds is not None:
                m.first_token_seconds.labels(model).observe(update.first_token_seconds)
            if update.inter_token_seconds is not None:
                m.inter_token_seconds.labels(model).observe(update.inter_token_seconds)
            handle = r.payload.handle  # type: ignore[union-attr]
            if update.chunk is not None:
                handle.push(update.chunk)
            if update.result is not None:
                self._end(r, update.result, Outcome.SUCCESS)
        self._publish_kv()

    def _publish_kv(self) -> None:
        generation = self._runner.generation
        self._metrics.kv_blocks_in_use.set(generation.used_blocks)
        self._metrics.kv_blocks.set(generation.total_blocks)
        self._metrics.resident_bytes.labels("kv").set(generation.used_bytes)
        self._metrics.kv_preemptions.inc(generation.preemptions - self._preemptions_seen)
        self._preemptions_seen = generation.preemptions

    def _answer_early(
        self, req: Request, embeddings: np.ndarray, logits: np.ndarray, exit_layers: np.ndarray
    ) -> None:
        """Called by the runner in the middle of a step: every input of ``req`` left at early exits, so
        it is answered now, not when the step ends (its later delivery then finds it answered)."""
        if not req.status.is_finished:
            self._deliver(req, last=(embeddings, logits, exit_layers))

    def _deliver(self, req: Request, last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Answer ``req`` from its computed parts (and ``last``, its final part's embeddings, logits and
        exit layers, when the step that computes it is still running)."""
        work = work_of(req)
        if self._scheduler.clock() > req.deadline:
            late = DeadlineExceeded(f"request for {req.model!r} finished after its deadline")
            self._end(req, late, Outcome.TIMEOUT)
            return
        parts = [work.embeddings, work.logits, work.exit_layers]
        if last is not None:
            parts = [[*done, part] for done, part in zip(parts, last, strict=True)]
        embeddings = np.concatenate(parts[0])
        prompt_tokens = sum(len(x) for x in work.token_ids)
        if work.classify:
            logits = np.concatenate(parts[1])
            labels = self._catalog.entry(req.model).config.labels
            names = [labels[i] for i in logits.argmax(axis=1)]
            exits = np.concatenate(parts[2]) if parts[2] else None
            result: object = ClassifyResult(logits, names, prompt_tokens, embeddings, exits)
        else:
            result = EmbedResult(embeddings, prompt_tokens)
        self._end(req, result, Outcome.SUCCESS)

    def _recover(self) -> None:
        """After a crash: fail the step that was executing, so the scheduler can go on."""
        step, self._current = self._current, None
        if step is None:
            return
        with self._lock:
            with contextlib.suppress(RuntimeError):  # RuntimeError: it was reported already
                self._scheduler.on_step_done(step, 0.0, ok=False)
            # Whatever state the crash left them in, the step's requests that are not answered and not
            # queued for a next part are failed.
            stranded = [
                r for r in step.batch if not future_of(r).done() and r.id not in self._scheduler.queues
            ]
            for r in stranded:
                self._scheduler.cancel(r.id, RequestStatus.FAILED)  # out of the running set
        error = PtmError("internal error while running this request; see the server log")
        self._end_all([(r, error, Outcome.ERROR) for r in stranded])

    # -- the deadline timer ---------------------------------------------------------------------------

    def _watch_deadlines(self) -> None:
        while not self._closed:
            try:
                self._expire_due()
            except Exception:  # noqa: BLE001 - the timer must outlive any bug; the worker expires too
                logger.exception("the deadline timer failed; retrying")
                time.sleep(_MAX_IDLE_S)

    def _expire_due(self) -> None:
        self._deadlines_moved.clear()
        with self._lock:
            now = self._scheduler.clock()
            expired = self._scheduler.expire(now)
            nxt = self._scheduler.next_deadline()
            # Bounded: a far deadline (years away) must not overflow the wait; earlier news wakes it.
            sleep = _MAX_TIMER_SLEEP_S if nxt is None else min(_MAX_TIMER_SLEEP_S, max(0.0, nxt - now))
            self._timer_wakes_at = now + sleep
        late = DeadlineExceeded("the request could not start before its deadline")
        self._end_all([(r, late, Outcome.TIMEOUT) for r in expired])
        self._deadlines_moved.wait(sleep)

    # -- outcomes and metrics: the one place ----------------------------------------------------------

    def _end(self, req: Request, answer: object, outcome: Outcome) -> None:
        """Answer ``req`` with a result or an error, and count its outcome once."""
        future = future_of(req)
        try:
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
        except InvalidStateError:  # the client cancelled it meanwhile; ``_cancelled`` counted it
            return
        self._count(req.model, outcome)

    def _end_all(self, endings: list[Ending]) -> None:
        for req, error, outcome in endings:
            self._end(req, error, outcome)

    def _cancelled(self, req: Request) -> None:
        """The client cancelled ``req`` (or went away): free its slot now."""
        with self._lock:
            self._scheduler.cancel(req.id)
        self._count(req.model, Outcome.CANCELLED)
        self._deadlines_moved.set()

    def _count(self, model: str, outcome: Outcome) -> None:
        self._metrics.requests.labels(model, outcome.value).inc()

    def _publish_start(self, step: Step) -> None:
        if step.model is None:
            return
        for r in step.batch:
            if step.spans.get(r.id, (0, 0))[0] == 0:  # its first part: the time it queued
                self._metrics.queue_seconds.labels(step.model).observe(step.started - r.arrival)

    def _publish_step(self, step: Step, output: RunnerOutput) -> None:
        model = step.model
        assert model is not None
        m = self._metrics
        m.compute_seconds.labels(model).observe(output.exec_seconds + output.wait_seconds)
        m.batch_size.labels(model).observe(len(step.batch))
        m.batch_tokens.labels(model).inc(step.tokens if output.tokens is None else output.tokens)
        if output.exit_layers:
            layers, counts = np.unique(np.concatenate(list(output.exit_layers.values())), return_counts=True)
            for layer, count in zip(layers.tolist(), counts.tolist(), strict=True):
                m.exits.labels(model, str(layer)).inc(count)
        stats = self._weights.stats()
        for tier in (stats.host, stats.device):
            m.resident_bytes.labels(tier.name).set(tier.used_bytes)
            for gone in self._published.get(tier.name, set()) - set(tier.per_model):
                m.model_resident_bytes.labels(gone, tier.name).set(0)
            for name, nbytes in tier.per_model.items():
                m.model_resident_bytes.labels(name, tier.name).set(nbytes)
            self._published[tier.name] = set(tier.per_model)

    def _on_memory_event(self, event: MemoryEvent) -> None:
        """Runs on loader threads: counters, and load news for the scheduler."""
        m = self._metrics
        if event.kind == "load":
            m.loaded_bytes.labels(event.model, event.tier).inc(event.nbytes)
            if event.tier == "device":
                m.loads.labels(event.model).inc()
                m.load_seconds.labels(event.model).inc(event.seconds)
        elif event.kind == "evict":
            m.evictions.labels(event.model, event.tier).inc()
            self._heap.freed()
        elif event.kind == "load_failed":
            logger.warning("loading %s into the %s tier failed: %s", event.model, event.tier, event.error)
        if event.kind != "evict" and event.tier == "device":
            self._load_events.put(event)
            self._news.set()
