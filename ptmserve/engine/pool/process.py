"""The worker process: one full ``Engine`` serving the calls that arrive over its pipe.

``run_worker`` is the target the pool spawns (``multiprocessing``'s spawn context: a fresh interpreter,
never a fork of a process that holds torch and threads). It builds the engine, says ``Hello`` and serves
until the front end sends ``Close`` or goes away (its pipe reaches EOF).

Inside, an asyncio loop owns the pipe's sending end: a reader thread hands each incoming message to the
loop, each ``Call`` becomes a task awaiting the engine's async API, and a ``Cancel`` cancels that task,
which cancels the engine request exactly as a disconnecting HTTP client does in one process.

A worker whose engine cannot serve any more (its step loop crashed three times in a minute) exits, so
that the pool starts a fresh one in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ptmserve.engine.api import ModelState
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.engine.pool import messages as m
from ptmserve.errors import PtmError
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

WATCH_SECONDS = 1.0  # how often the worker checks that its engine still serves
_STOP = object()  # the inbox's last item: the worker is done


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker process needs to start (pickled into it)."""

    index: int  # its slot in the pool; names it in logs and errors
    repo: str  # the model repository's folder
    settings: EngineSettings  # with ``shared_memory`` set to the pool's folder
    threads: int  # torch intra-op threads
    log_level: int


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process: build the engine, then serve ``conn`` until told to stop."""
    # The front end decides when a worker stops (Close), and a worker stops by itself when the front end
    # is gone (EOF): a Ctrl-C or a SIGTERM sent to the whole process group must not cut requests short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s worker-{spec.index} %(name)s: %(message)s",
    )
    import torch

    torch.set_num_threads(spec.threads)
    try:
        engine = Engine(Repository(spec.repo), spec.settings)
    except PtmError as exc:
        conn.send(m.StartFailed(m.ErrorRecord.of(exc)))
        return
    logger.info("pid %d serving with %d thread(s)", os.getpid(), spec.threads)
    asyncio.run(WorkerServer(engine, conn).serve())


class WorkerServer:
    """Serves one pipe with one engine (in the worker process)."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._handlers: dict[str, Callable[[m.Call], Awaitable[Any]]] = {
            m.EMBED: lambda c: engine.aembed(c.args["model"], c.args["inputs"], c.args["options"]),
            m.CLASSIFY: lambda c: engine.aclassify(c.args["model"], c.args["inputs"], c.args["options"]),
            m.GENERATE: self._generate,
            m.LOAD: lambda c: asyncio.to_thread(engine.load, c.args["name"]),
            m.UNLOAD: lambda c: asyncio.to_thread(engine.unload, c.args["name"]),
            m.WARM_UP: lambda c: asyncio.to_thread(engine.warm_up),
            m.METRICS: self._metrics,
            m.TIERS: self._tiers,
        }

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[object] = asyncio.Queue()
        reader = threading.Thread(target=self._read, args=(loop, inbox), name="ptmserve-pipe", daemon=True)
        reader.start()
        self._send(m.Hello(os.getpid(), _dtype_name(self.engine), str(self.engine.device), self._state(True)))
        watchdog = asyncio.create_task(self._watch())
        while (message := await inbox.get()) is not _STOP:
            if message is None:  # the front end went away: nobody is left to answer
                logger.warning("the front end closed the pipe; closing the engine")
                self._begin_close(0.0, inbox)
            elif isinstance(message, m.Close):
                self._begin_close(message.drain_seconds, inbox)
            elif isinstance(message, m.Cancel):
                task = self._tasks.get(message.id)
                if task is not None:
                    task.cancel()
            elif isinstance(message, m.Call):
                task = asyncio.create_task(self._run(message))
                self._tasks[message.id] = task
                task.add_done_callback(lambda _t, i=message.id: self._tasks.pop(i, None))
        watchdog.cancel()

    def _read(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[object]) -> None:
        """Reader thread: every message to the loop; None at EOF."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = None
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message is None:
                return

    def _send(self, message: object) -> None:
        """Send on the pipe (only ever from the loop's thread, so sends never interleave)."""
        with contextlib.suppress(OSError, ValueError):  # the front end is gone: the reader sees EOF
            self.conn.send(message)

    # -- calls ----------------------------------------------------------------------------------------

    async def _run(self, call: m.Call) -> None:
        control = call.op in (m.LOAD, m.UNLOAD, m.WARM_UP)
        try:
            value = await self._handlers[call.op](call)
        except asyncio.CancelledError:
            return  # the front end cancelled it: nobody waits for an answer
        except PtmError as exc:
            self._send(m.Failure(call.id, m.ErrorRecord.of(exc), self._state(control)))
        except Exception as exc:
            logger.exception("call %s (%s) failed", call.id, call.op)
            self._send(m.Failure(call.id, m.ErrorRecord.of(exc), self._state(control)))
        else:
            self._send(m.Reply(call.id, value, self._state(control)))

    async def _generate(self, call: m.Call) -> Any:
        """Start the generation, stream its chunks, and return its result (raises its error)."""
        a = call.args
        generation = await self.engine.acomplete(a["model"], a["prompt"], a["params"], a["options"])
        self._send(m.Started(call.id, generation.prompt_tokens))
        async for chunk in generation:
            self._send(m.Chunk(call.id, chunk))
        return generation.result(timeout=0)

    async def _metrics(self, call: m.Call) -> Any:
        return list(self.engine.metrics.registry.collect())

    async def _tiers(self, call: m.Call) -> Any:
        return self.engine.tiers()

    def _state(self, with_unavailable: bool = False) -> m.WorkerState:
        unavailable = None
        if with_unavailable:
            infos = self.engine.models()
            unavailable = {i.name: i.reason for i in infos if i.state is ModelState.UNAVAILABLE}
        return m.WorkerState(self.engine.weights.resident_models(), unavailable)

    # -- lifecycle ------------------------------------------------------------------------------------

    def _begin_close(self, drain_seconds: float, inbox: asyncio.Queue[object]) -> None:
        if self._closing:
            return
        self._closing = True

        async def close() -> None:
            await asyncio.to_thread(self.engine.close, drain_seconds)
            pending = [t for t in self._tasks.values() if not t.done()]
            if pending:  # their requests ended with the engine: let them send their answers
                await asyncio.wait(pending, timeout=5.0)
            inbox.put_nowait(_STOP)

        self._close_task = asyncio.get_running_loop().create_task(close())

    async def _watch(self) -> None:
        """Exit when the engine can no longer serve, so that the pool replaces this process."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            reason = self.engine.unready_reason()
            if reason is not None and not self._closing:
                logger.error("the engine cannot serve (%s); exiting: the pool starts a new worker", reason)
                os._exit(70)


def _dtype_name(engine: Engine) -> str:
    return str(engine.dtype).removeprefix("torch.")
