"""The load generator of ``bench trace --mode real``, in a process of its own.

Until issue 13 the replay ran as asyncio tasks in the bench process: the generator shared the engine's
interpreter (its GIL) and its event loop. Now a ``spawn`` child replays the trace: it sends each arrival
at its time over a pipe, times each answer as a client would, and reports one ``Record`` per arrival.
The engine stays in the bench process, where a small server (``serve``) hands each ``Submit`` to the
engine target and answers with a ``Done``: a pipe costs the engine's process a pickle and a socket write
per request, where HTTP would add parsing and routing (that cost is ``bench http``'s subject, not the
scheduler's). The child measures its own CPU time, so the report says what the generator cost.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from ptmserve.engine.requests import ClassDefaults, Outcome, deadline_from, request_class
from ptmserve.engine.simulator import Arrival, Record
from ptmserve.errors import DeadlineExceeded, Overloaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Submit:
    """Generator -> engine: run arrival ``index``."""

    index: int
    model: str
    tokens: int
    priority: int
    timeout_us: int | None


@dataclass(frozen=True, slots=True)
class Done:
    """Engine -> generator: arrival ``index`` ended with ``outcome`` (an ``Outcome`` value)."""

    index: int
    outcome: str


@dataclass(slots=True)
class LoadReport:
    """Generator -> bench: what it sent and saw."""

    records: list[Record]  # one per arrival, times in seconds from the start of the replay
    cpu_seconds: float  # the generator process's CPU time (user + system) during the replay
    wall_seconds: float
    send_lag_p50_s: float  # how late a request was sent after its scheduled time
    send_lag_max_s: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_per_request_s(self) -> float:
        return self.cpu_seconds / max(1, len(self.records))


def _child(conn: Connection, arrivals: Sequence[Arrival], defaults: ClassDefaults) -> None:
    """The generator process: wait for "go", replay ``arrivals``, send a ``LoadReport``."""
    conn.send("ready")
    if conn.recv() != "go":
        return
    cpu0, t0 = time.process_time(), time.monotonic()
    records: list[Record | None] = [None] * len(arrivals)
    sent_at = [0.0] * len(arrivals)
    lags: list[float] = []
    ready = threading.Event()

    def send_all() -> None:
        for i, a in enumerate(arrivals):
            delay = t0 + a.time - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic() - t0
            lags.append(max(0.0, now - a.time))
            cls = request_class(a.priority, defaults.default_class)
            sent_at[i] = now
            records[i] = Record(i, a.model, cls, now, deadline_from(a.timeout_us, cls, now, defaults))
            ready.set()
            conn.send(Submit(i, a.model, a.tokens, a.priority, a.timeout_us))

    sender = threading.Thread(target=send_all, name="loadgen-send", daemon=True)
    sender.start()
    for _ in range(len(arrivals)):
        done: Done = conn.recv()
        now = time.monotonic() - t0
        sender_rec = records[done.index]
        while sender_rec is None:  # the answer can beat the sender's bookkeeping by microseconds
            ready.wait(0.001)
            sender_rec = records[done.index]
        outcome = Outcome(done.outcome)
        if outcome is Outcome.SUCCESS and now > sender_rec.deadline:
            outcome = Outcome.TIMEOUT  # delivered, but later than the client's deadline
        sender_rec.outcome, sender_rec.finish = outcome, now
    sender.join()
    lags.sort()
    conn.send(
        LoadReport(
            records=[r for r in records if r is not None],
            cpu_seconds=time.process_time() - cpu0,
            wall_seconds=time.monotonic() - t0,
            send_lag_p50_s=lags[len(lags) // 2] if lags else 0.0,
            send_lag_max_s=lags[-1] if lags else 0.0,
        )
    )


class LoadGenerator:
    """A spawned process that replays ``arrivals`` against whatever answers its pipe (``serve``)."""

    def __init__(self, arrivals: Sequence[Arrival], defaults: ClassDefaults = ClassDefaults()) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.n = len(arrivals)
        self.process = ctx.Process(
            target=_child, args=(child, list(arrivals), defaults), name="ptmserve-loadgen", daemon=True
        )
        self.process.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("the load generator did not start")

    async def serve(self, target: object) -> LoadReport:
        """Start the replay and answer its requests through ``target.submit`` (``trace.EngineTarget``)
        until the generator reports; returns its report."""
        loop = asyncio.get_running_loop()
        report: asyncio.Future[LoadReport] = loop.create_future()
        tasks: set[asyncio.Task[None]] = set()

        async def one(msg: Submit) -> None:
            try:
                await target.submit(msg.model, msg.tokens, msg.priority, msg.timeout_us)  # type: ignore[attr-defined]
                outcome = Outcome.SUCCESS
            except DeadlineExceeded:
                outcome = Outcome.TIMEOUT
            except Overloaded:
                outcome = Outcome.REJECTED
            except Exception:  # noqa: BLE001 - any other failure is an error outcome
                logger.debug("request %d failed", msg.index, exc_info=True)
                outcome = Outcome.ERROR
            self.conn.send(Done(msg.index, outcome.value))

        def readable() -> None:
            while not report.done() and self.conn.poll():
                try:
                    msg = self.conn.recv()
                except EOFError:
                    report.set_exception(RuntimeError("the load generator exited without a report"))
                    return
                if isinstance(msg, Submit):
                    task = loop.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(msg, LoadReport):
                    report.set_result(msg)

        loop.add_reader(self.conn.fileno(), readable)
        try:
            self.conn.send("go")
            return await report
        finally:
            loop.remove_reader(self.conn.fileno())
            self.close()

    def close(self) -> None:
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
