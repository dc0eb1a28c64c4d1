"""``WorkerPool``: N engine worker processes behind one front end, with the API of ``Engine``.

The split (docs/architecture.md, "Processes"): the front end (this object, in the HTTP server's process)
holds the model catalog, checks requests and tokenizes them, and routes each to a worker; each worker
process runs a whole ``Engine`` (scheduler, step loop, weight tiers, KV cache) with its own device budget
and computes. Their host tiers live in one shared-memory folder, so every worker maps the same weight
bytes. Requests cross a pipe per worker as token ids; results come back as numpy arrays, generations as a
stream of chunks.

Routing is by model affinity (``routing.py``). A worker that dies is replaced (``slot.py``): the requests
it held fail with 503 naming it, the others carry on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from ptmserve.engine.api import (
    Generation,
    GenerationParams,
    InferenceOptions,
    TierUsage,
)
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.device import resolve_device, resolve_dtype
from ptmserve.engine.engine import EngineSettings
from ptmserve.engine.pool import messages as m
from ptmserve.engine.pool.frontend import FrontEnd
from ptmserve.engine.pool.metrics import PoolMetrics, Snapshot, WorkerVitals, worker_families
from ptmserve.engine.pool.process import WorkerSpec
from ptmserve.engine.pool.routing import choose_worker
from ptmserve.engine.pool.slot import START_SECONDS, WorkerSlot
from ptmserve.engine.states import ModelStates
from ptmserve.errors import InvalidConfig, NotReady
from ptmserve.memory.shared import process_alive
from ptmserve.store.manifest import dtype_name
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

METRICS_TIMEOUT_SECONDS = 2.0  # a worker that does not send its metrics by then is left out of /metrics


class WorkerPool(FrontEnd):
    """Serves a repository with ``workers`` engine processes. The same API as ``Engine`` for the server
    (``ptmserve.server.dataplane.EngineLike``); ``warm_up()`` before serving, ``close()`` at the end.

    Raises (from the constructor):
        InvalidConfig: ``workers`` < 1, or a worker's engine refused the settings.
        NotReady: a worker process could not start.
    """

    def __init__(
        self,
        repo_dir: str | Path,
        settings: EngineSettings,
        *,
        workers: int,
        threads_per_worker: int = 1,
        start_seconds: float = START_SECONDS,
    ) -> None:
        if workers < 1 or threads_per_worker < 1:
            raise InvalidConfig(
                f"workers and threads_per_worker must be >= 1, got {workers} and {threads_per_worker}"
            )
        self.settings = settings
        self._route_lock = threading.Lock()  # one routing decision (and its registration) at a time
        self.device = resolve_device(settings.device)  # as each worker's engine resolves them
        self.dtype = dtype_name(resolve_dtype(settings.dtype, self.device))
        self.catalog = ModelCatalog(Repository(Path(repo_dir)), self.dtype, truncate=settings.truncate)
        self.states = ModelStates(self.catalog, settings.model_control, unavailable=self._unavailable)
        self.shared_memory = _make_shared_folder()
        worker_settings = dataclasses.replace(settings, shared_memory=str(self.shared_memory))
        context = multiprocessing.get_context("spawn")  # never fork a process holding torch and threads
        level = logging.getLogger("ptmserve").getEffectiveLevel()
        self._slots = [
            WorkerSlot(
                WorkerSpec(i, str(repo_dir), worker_settings, threads_per_worker, level),
                context,
                replay=self._models_to_replay,
                start_seconds=start_seconds,
            )
            for i in range(workers)
        ]
        self._preparers = ThreadPoolExecutor(2, thread_name_prefix="ptmserve-tokenize")
        try:
            self._start_workers(start_seconds)
        except BaseException:
            self.close(drain_seconds=0)
            raise
        self.metrics = PoolMetrics(self._worker_metrics, self._own_metrics)
        logger.info(
            "%d engine workers (%d thread(s) each) on %s in %s; host tier shared in %s",
            *(workers, threads_per_worker, self.device, self.dtype, self.shared_memory),
        )

    def _start_workers(self, start_seconds: float) -> None:
        """Start every worker at once and wait until each said Hello."""
        for slot in self._slots:
            slot.start()
        deadline = time.monotonic() + start_seconds
        for slot in self._slots:
            if not slot.wait_started(max(deadline - time.monotonic(), 0.0)):
                raise NotReady(f"{slot.label} did not start within {start_seconds:.0f} s")
            if slot.start_error is not None:
                raise slot.start_error

    @property
    def pids(self) -> list[int | None]:
        """Each worker's process id (None while one starts), by slot."""
        return [slot.pid for slot in self._slots]

    # -- models ---------------------------------------------------------------------------------------

    def _unavailable(self, name: str) -> str | None:
        """Why a live worker refuses ``name`` (a budget it can never fit there, a failed load), or None."""
        for slot in self._slots:
            reason = (slot.state.unavailable or {}).get(name) if slot.live else None
            if reason is not None:
                return reason
        return None

    def _models_to_replay(self) -> list[str]:
        """The models a fresh worker must load before it serves (explicit control only)."""
        return self.states.loaded()

    def load(self, name: str) -> None:
        """Load ``name`` in every worker (under explicit control, make it serve); LOADING meanwhile.
        A worker started later loads it before it takes requests.

        Raises:
            ModelNotFound; CorruptData or NotReady when a worker cannot load it.
        """
        self.states.load(name, lambda: self._on_every_worker(m.LOAD, {"name": name}))

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (under explicit control) in every worker and free its bytes there."""
        self.states.unload(name)
        self._on_every_worker(m.UNLOAD, {"name": name})

    def warm_up(self) -> None:
        """Every worker warms up (``Engine.warm_up``) at once: the first client pays neither a load nor
        the kernels' first-call set-up, whichever worker it reaches."""
        self._on_every_worker(m.WARM_UP, {})

    def ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """None while the pool accepts requests and at least one worker serves."""
        if not self.states.accepting:
            return "the engine is shutting down"
        if any(slot.live for slot in self._slots):
            return None
        down = "; ".join(f"{slot.label}: {slot.down_reason}" for slot in self._slots)
        return f"no engine worker is running ({down})"

    def tiers(self) -> list[TierUsage]:
        """Every live worker's tiers, named ``worker<i>/<tier>`` (each worker has its own device tier and
        KV cache; their host tiers account the shared bytes each maps)."""
        out: list[TierUsage] = []
        for slot, value in self._on_live_workers(m.TIERS, {}, None):
            if isinstance(value, BaseException):
                continue
            out += [dataclasses.replace(t, name=f"worker{slot.index}/{t.name}") for t in value]
        return out

    # -- inference ------------------------------------------------------------------------------------

    async def _send_encoder(
        self, model: str, ids: list[list[int]], options: InferenceOptions, *, classify: bool
    ) -> Any:
        args = {"model": model, "inputs": ids, "options": options}
        return await asyncio.wrap_future(self._submit(model, m.CLASSIFY if classify else m.EMBED, args))

    async def _generate(
        self, model: str, ids: str | Sequence[int], params: GenerationParams, options: InferenceOptions
    ) -> Generation:
        args = {"model": model, "prompt": ids, "params": params, "options": options}
        return await asyncio.wrap_future(self._submit(model, m.GENERATE, args))

    def _submit(self, model: str, op: str, args: dict[str, Any]) -> Future[Any]:
        """Send one request for ``model`` to the worker routing picks (NotReady when none is live)."""
        with self._route_lock:
            index = choose_worker(model, [slot.load() for slot in self._slots])
            if index is None:
                raise NotReady(f"no engine worker can take requests for {model!r}: {self.unready_reason()}")
            return self._slots[index].submit(op, args, model)

    # -- every worker ---------------------------------------------------------------------------------

    def _on_live_workers(
        self, op: str, args: dict[str, Any], timeout: float | None
    ) -> list[tuple[WorkerSlot, Any]]:
        """Send one call to every live worker at once; (worker, its result or error) for those that
        answered within ``timeout``."""
        sent: list[tuple[WorkerSlot, Future[Any]]] = []
        for slot in self._slots:
            try:
                sent.append((slot, slot.submit(op, args)))
            except NotReady:
                continue  # died meanwhile
        wait([f for _, f in sent], timeout)
        out: list[tuple[WorkerSlot, Any]] = []
        for slot, future in sent:
            if not future.done():
                future.cancel()
                logger.warning("%s did not answer %s within %.1f s", slot.label, op, timeout or 0)
            elif future.exception() is not None:
                out.append((slot, future.exception()))
            else:
                out.append((slot, future.result()))
        return out

    def _on_every_worker(self, op: str, args: dict[str, Any]) -> None:
        """Run one call on every live worker; raise the first error. NotReady when no worker is live."""
        answers = self._on_live_workers(op, args, None)
        if not answers:
            raise NotReady(f"cannot {op.replace('_', ' ')}: {self.unready_reason()}")
        for _, value in answers:
            if isinstance(value, BaseException):
                raise value

    def _worker_metrics(self) -> Snapshot:
        answers = self._on_live_workers(m.METRICS, {}, METRICS_TIMEOUT_SECONDS)
        return [(str(slot.index), value) for slot, value in answers if not isinstance(value, BaseException)]

    def _own_metrics(self) -> Iterable[Metric]:
        return worker_families(
            [WorkerVitals(str(s.index), s.live, s.pid, s.in_flight(), s.restarts) for s in self._slots]
        )

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting requests; every worker finishes what it holds (up to ``drain_seconds``), closes
        its engine and exits; then the shared-memory folder is removed."""
        if not self.states.accepting:
            return
        self.states.accepting = False
        for slot in self._slots:
            slot.request_close(drain_seconds)
        deadline = time.monotonic() + drain_seconds + 15.0
        for slot in self._slots:
            slot.join(max(deadline - time.monotonic(), 0.1))
        self._preparers.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.shared_memory, ignore_errors=True)
        logger.info("engine workers stopped; removed %s", self.shared_memory)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_shared_folder() -> Path:
    """A new folder for the shared host tier: on /dev/shm (a tmpfs) where there is one, named after this
    process so that a folder left by a killed server can be told apart."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix=f"ptmserve-{os.getpid()}-", dir=base))
    _remove_abandoned(folder.parent)
    return folder


def _remove_abandoned(base: Path) -> None:
    """Remove the shared folders of servers that no longer run (killed before they could clean up): their
    files would otherwise hold memory until the machine restarts."""
    for folder in base.glob("ptmserve-*-*"):
        pid = folder.name.split("-")[1]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        logger.info("removing %s, left by server process %s", folder, pid)
        shutil.rmtree(folder, ignore_errors=True)
