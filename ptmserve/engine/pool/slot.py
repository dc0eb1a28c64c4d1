"""The front end's side of one worker: its process, its pipe, the calls in flight on it, and restarts.

A ``WorkerSlot`` is one seat of the pool. Its supervisor thread starts the worker process, waits for its
``Hello``, replays the explicit loads a fresh worker must have, and then reads every message the worker
sends, settling the calls it answers. When the pipe reaches EOF the worker is gone (SIGKILL, a crash, an
out-of-memory kill): every call in flight on it fails with ``NotReady`` (503) naming the worker, its
routing entry is cleared, and after a back-off a new process takes the seat. Nothing else is lost: the
other slots never notice.

Calls are sent from any thread (the event loop, or a thread doing a load); the supervisor is the only
reader. ``_lock`` guards the table of calls in flight and the liveness flag together, so a call is
either registered before the worker's death is noticed (and failed with it) or refused.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ptmserve.engine.api import Generation
from ptmserve.engine.pool import messages as m
from ptmserve.engine.pool.process import WorkerSpec, run_worker
from ptmserve.engine.pool.routing import WorkerLoad
from ptmserve.errors import NotReady, PtmError

logger = logging.getLogger(__name__)

START_SECONDS = 300.0  # a worker that has not said Hello by then is killed and started again
FIRST_BACKOFF_SECONDS = 0.5  # wait before restarting a worker that died; doubles while it keeps dying
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_SECONDS = 60.0  # a worker that served this long before dying restarts after the first back-off
REAP_SECONDS = 5.0  # after EOF, how long the process gets to exit before it is killed


class _WorkerGone(Exception):
    """The worker process ended (or never said Hello) before it could serve."""


@dataclass(slots=True)
class _InFlight:
    """One call sent to the worker and not yet answered."""

    model: str | None  # the model it is for (routing counts them); None for control calls
    future: Future[Any]  # the call's result; for a generation, its ``Generation`` once admitted
    generation: Generation | None = None  # a generation's handle, after ``Started``


class WorkerSlot:
    """One seat of the pool. ``start()`` it; ``submit`` calls while it is ``live``; ``close`` it."""

    def __init__(
        self,
        spec: WorkerSpec,
        context: Any,
        *,
        replay: Callable[[], list[str]],
        start_seconds: float = START_SECONDS,
    ) -> None:
        """
        Args:
            spec: what the worker process is started with.
            context: a ``multiprocessing`` spawn context.
            replay: the models every worker must have loaded (explicit model control); a fresh process
                loads them before it takes requests.
            start_seconds: how long a worker may take to start.
        """
        self.index = spec.index
        self._spec = spec
        self._context = context
        self._replay = replay
        self._start_seconds = start_seconds
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._in_flight: dict[int, _InFlight] = {}
        self._conn: Connection | None = None
        self._process: Any = None
        self._live = False
        self._closing = threading.Event()
        self._first_start = threading.Event()  # set once the first process said Hello or failed to start
        self.hello: m.Hello | None = None  # the current (or last) process's Hello
        self.state = m.WorkerState(frozenset(), {})
        self.start_error: PtmError | None = None  # why the first process could not start its engine
        self.restarts = 0
        self.down_reason = "starting"  # why it is not live, while it is not
        self._thread = threading.Thread(
            target=self._supervise, name=f"ptmserve-worker-{self.index}", daemon=True
        )

    # -- what the pool reads --------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._live

    @property
    def pid(self) -> int | None:
        return self.hello.pid if self.hello is not None else None

    @property
    def label(self) -> str:
        """How errors and logs name this worker: ``worker 1 (pid 4242)``."""
        pid = self.pid
        return f"worker {self.index}" + (f" (pid {pid})" if pid is not None else "")

    def load(self) -> WorkerLoad:
        """This worker as routing sees it now."""
        with self._lock:
            models = Counter(c.model for c in self._in_flight.values() if c.model is not None)
            return WorkerLoad(
                self.index, self._live, len(self._in_flight), self.state.device_models, frozenset(models)
            )

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_started(self, timeout: float) -> bool:
        """Wait until the first process said Hello (or failed to start); False on timeout."""
        return self._first_start.wait(timeout)

    def request_close(self, drain_seconds: float) -> None:
        """Stop taking calls and ask the worker to finish what it has (up to ``drain_seconds``) and exit."""
        self._closing.set()
        with self._lock:
            was_live, self._live = self._live, False
            self.down_reason = "shutting down"
        if was_live:
            self._send(m.Close(drain_seconds))
        elif self._process is not None and self._process.is_alive():
            self._process.kill()  # still starting: nothing of value in it

    def join(self, timeout: float) -> None:
        """Wait for the worker process and the supervisor to end; kill the process if it outlives
        ``timeout``."""
        if self._thread.ident is None:
            return  # never started
        self._thread.join(timeout)
        process = self._process
        if process is not None and process.is_alive():
            logger.warning("%s did not exit in time; killing it", self.label)
            process.kill()
        self._thread.join(REAP_SECONDS)

    # -- calls ----------------------------------------------------------------------------------------

    def submit(self, op: str, args: dict[str, Any], model: str | None = None) -> Future[Any]:
        """Send one call; its future settles with the worker's reply (for ``GENERATE``: with the
        ``Generation`` once the worker admitted it). Cancelling the future cancels the call on the worker.

        Raises:
            NotReady: the worker is not live (dead, restarting, shutting down) or its pipe is closed.
        """
        future: Future[Any] = Future()
        with self._lock:
            if not self._live:
                raise NotReady(f"{self.label} cannot take requests: {self.down_reason}")
            call_id = next(self._ids)
            self._in_flight[call_id] = _InFlight(model, future)
        future.add_done_callback(lambda f: self._on_done(call_id, f))
        if not self._send(m.Call(call_id, op, args)):
            self._forget(call_id)
            raise NotReady(f"{self.label} cannot take requests: its pipe is closed")
        return future

    def _on_done(self, call_id: int, future: Future[Any]) -> None:
        """A call's future (or its generation's) settled: if the caller cancelled it, tell the worker."""
        if future.cancelled() and self._forget(call_id) is not None:
            self._send(m.Cancel(call_id))

    def _forget(self, call_id: int) -> _InFlight | None:
        with self._lock:
            return self._in_flight.pop(call_id, None)

    def _send(self, message: object) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.send(message)
            return True
        except (OSError, ValueError):  # the worker is gone; the supervisor notices and fails its calls
            return False

    # -- the supervisor thread ------------------------------------------------------------------------

    def _supervise(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while not self._closing.is_set():
            began = time.monotonic()
            try:
                self._start_process()
                self._await_hello()
                self._replay_loads()
            except (_WorkerGone, PtmError, OSError) as exc:
                how = f"{exc.message if isinstance(exc, PtmError) else exc} ({self._reap()})"
                if not self._first_start.is_set() and not self._closing.is_set():
                    # The first start failed (a bad setting, a broken install): starting again would fail
                    # the same way. The pool reports it and does not serve. Later failures are retried.
                    self.start_error = exc if isinstance(exc, PtmError) else NotReady(f"{self.label} {how}")
                    self.down_reason = f"it could not start: {how}"
                    logger.error("%s could not start: %s", self.label, how)
                    self._first_start.set()
                    return
            else:
                with self._lock:
                    self._live = not self._closing.is_set()
                self._first_start.set()
                self._read_until_eof()
                how = self._reap()
            self._fail_in_flight(how)
            if self._closing.is_set():
                return
            if time.monotonic() - began > HEALTHY_SECONDS:
                backoff = FIRST_BACKOFF_SECONDS
            logger.error("%s %s; starting a new worker in %.1f s", self.label, how, backoff)
            self._closing.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            self.restarts += 1

    def _start_process(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=run_worker, args=(self._spec, child), name=f"ptmserve-worker-{self.index}", daemon=True
        )
        process.start()
        child.close()  # else the pipe never reaches EOF when the worker dies
        with self._lock:
            self._conn, self._process, self.hello = parent, process, None

    def _await_hello(self) -> None:
        """Wait for the worker's Hello (raises its ``StartFailed`` error, or ``_WorkerGone``)."""
        message = self._receive(self._start_seconds)
        if isinstance(message, m.StartFailed):
            error = message.error.rebuild(self.label)
            raise error if isinstance(error, PtmError) else _WorkerGone(str(error))
        if not isinstance(message, m.Hello):
            raise _WorkerGone(f"sent {type(message).__name__} before Hello")
        with self._lock:
            self.hello, self.state = message, message.state
        logger.info("%s started on %s in %s", self.label, message.device, message.dtype)

    def _replay_loads(self) -> None:
        """Load the explicitly loaded models into a fresh worker, before it takes requests."""
        for name in self._replay():
            call_id = next(self._ids)
            if not self._send(m.Call(call_id, m.LOAD, {"name": name})):
                raise _WorkerGone("its pipe closed while it loaded its models")
            while True:
                message = self._receive(self._start_seconds)
                if isinstance(message, (m.Reply, m.Failure)) and message.id == call_id:
                    break
            self._update_state(message.state)
            if isinstance(message, m.Failure):
                logger.error("%s could not load %s: %s", self.label, name, message.error.message)

    def _receive(self, timeout: float) -> object:
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(timeout):
                raise _WorkerGone(f"did not start within {timeout:.0f} s")
            return conn.recv()
        except (EOFError, OSError):
            raise _WorkerGone("exited while starting") from None

    def _read_until_eof(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            try:
                self._dispatch(message)
            except Exception:  # a bug here must not stop the supervisor
                logger.exception("%s: cannot handle %s", self.label, type(message).__name__)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, m.Chunk):
            with self._lock:
                call = self._in_flight.get(message.id)
            if call is not None and call.generation is not None:
                call.generation.push(message.chunk)
        elif isinstance(message, m.Started):
            with self._lock:
                call = self._in_flight.get(message.id)
            if call is not None:
                generation = Generation(message.prompt_tokens)
                call.generation = generation
                generation.future.add_done_callback(lambda f, i=message.id: self._on_done(i, f))
                _settle(call.future, value=generation)
        elif isinstance(message, (m.Reply, m.Failure)):
            self._update_state(message.state)
            call = self._forget(message.id)
            if call is None:
                return  # cancelled meanwhile
            target = call.generation.future if call.generation is not None else call.future
            if isinstance(message, m.Reply):
                _settle(target, value=message.value)
            else:
                _settle(target, error=message.error.rebuild(self.label))

    def _update_state(self, state: m.WorkerState) -> None:
        with self._lock:
            unavailable = state.unavailable if state.unavailable is not None else self.state.unavailable
            self.state = m.WorkerState(state.device_models, unavailable)

    def _reap(self) -> str:
        """Wait for the ended process and say how it ended ("was killed by SIGKILL")."""
        with self._lock:
            self._live = False
            process, conn = self._process, self._conn
        if conn is not None:
            conn.close()
        if process is None:
            return "did not start"
        process.join(REAP_SECONDS)
        if process.is_alive():  # it closed its pipe but lives on: it cannot serve, so end it
            process.kill()
            process.join(REAP_SECONDS)
        code = process.exitcode
        if code is None:
            return "did not exit"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return "exited" if code == 0 else f"exited with status {code}"

    def _fail_in_flight(self, how: str) -> None:
        """Fail every call in flight on the ended worker and clear its routing entry."""
        with self._lock:
            calls, self._in_flight = self._in_flight, {}
            self.state = m.WorkerState(frozenset(), self.state.unavailable)
            self.down_reason = f"it {how}" + ("" if self._closing.is_set() else "; restarting")
        if self._closing.is_set():
            error = NotReady("the server is shutting down")
        else:
            error = NotReady(f"{self.label} {how} while serving this request; the other workers carry on")
        for call in calls.values():
            target = call.generation.future if call.generation is not None else call.future
            _settle(target, error=error)
        if calls:
            logger.warning("%s %s: %d request(s) in flight on it failed", self.label, how, len(calls))


def _settle(future: Future[Any], *, value: Any = None, error: BaseException | None = None) -> None:
    """Set a future's result or error, unless its caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass
