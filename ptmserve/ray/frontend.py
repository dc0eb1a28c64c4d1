"""``RayEngine``: the ingress's engine, with the API the HTTP layer calls (``EngineLike``), forwarding to
the engine replicas of a Ray Serve deployment through a ``DeploymentHandle``.

It plays the part the worker pool's front end plays for ``serve --workers N`` (``engine/pool/pool.py``)
and reuses its pieces: the model catalog and states (so a request is refused here as one engine refuses
it: 400, 404, 413 ... before any replica sees it), tokenizing (``engine/prepare.py``), and the merged
metrics (``PoolMetrics``). Every request goes to the replica ``TierRouter`` picks, with its model as the
handle's ``multiplexed_model_id``; streams go through ``handle.options(stream=True)``.

Faults: a replica that dies while it holds requests fails them with ``NotReady`` (503) naming it; they
are not retried (a retry could run the same work twice, and a generation may already have streamed part
of its text). Ray starts a new replica in its place. Every call has a timeout (its deadline plus
``grace_s``; a stream, ``stream_idle_s`` between items), so no request waits forever on a replica that
hangs or on a deployment with no replica left: it ends with 504 ``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray.exceptions
from prometheus_client.metrics_core import Metric

from ptmserve.engine.api import (
    Generation,
    GenerationChunk,
    GenerationParams,
    InferenceOptions,
    TierUsage,
)
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.device import resolve_device, resolve_dtype
from ptmserve.engine.engine import EngineSettings
from ptmserve.engine.pool.frontend import FrontEnd
from ptmserve.engine.pool.messages import WorkerError
from ptmserve.engine.pool.metrics import PoolMetrics, Snapshot, WorkerVitals, worker_families
from ptmserve.engine.requests import ClassDefaults, request_class
from ptmserve.engine.states import ModelStates
from ptmserve.errors import DeadlineExceeded, NotReady
from ptmserve.ray import board
from ptmserve.ray import calls as c
from ptmserve.store.manifest import dtype_name
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

GRACE_SECONDS = 5.0  # a call may take its deadline plus this before the ingress gives up on it
STREAM_IDLE_SECONDS = 60.0  # a started stream may go this long without an item
CONTROL_SECONDS = 120.0  # load, unload, metrics and tiers calls
METRICS_SECONDS = 2.0  # a replica that does not send its metrics by then is left out of /metrics


class RayEngine(FrontEnd):
    """Serves a repository with the engine replicas behind ``handle`` (see the module docstring).

    Args:
        handle: the replica deployment's handle (``TierRouter`` routes it, or Ray's default router).
        repo_dir: the model repository (the same folder, or shared storage, the replicas read).
        settings: the replicas' engine settings (this side reads the dtype, truncation, model control and
            the classes' default timeouts).
        replicas: how many replicas the deployment runs (``tiers`` and ``/metrics`` wait for them at first).
    """

    def __init__(
        self,
        handle: Any,
        repo_dir: str | Path,
        settings: EngineSettings,
        *,
        replicas: int = 1,
        grace_s: float = GRACE_SECONDS,
        stream_idle_s: float = STREAM_IDLE_SECONDS,
    ) -> None:
        self.settings = settings
        self._handle = handle
        self._deployment = (handle.app_name, handle.deployment_name)
        self._replicas = replicas
        self._grace = grace_s
        self._stream_idle = stream_idle_s
        self.catalog = ModelCatalog(Repository(Path(repo_dir)), _dtype(settings), truncate=settings.truncate)
        self.states = ModelStates(self.catalog, settings.model_control, unavailable=self._unavailable)
        self._defaults = ClassDefaults(
            realtime_timeout_s=settings.realtime_timeout_s, batch_timeout_s=settings.batch_timeout_s
        )
        self._preparers = ThreadPoolExecutor(2, thread_name_prefix="ptmserve-tokenize")
        self._blocking = ThreadPoolExecutor(2, thread_name_prefix="ptmserve-ray-sync")
        self.metrics = PoolMetrics(self._replica_metrics, self._own_metrics)

    # -- models ---------------------------------------------------------------------------------------

    def _unavailable(self, name: str) -> str | None:
        """Why a replica refuses ``name`` (a budget it can never fit), or None."""
        for state in board.states():
            reason = state.unavailable.get(name)
            if reason is not None:
                return reason
        return None

    def load(self, name: str) -> None:
        """Bring ``name`` onto every replica's device (under explicit control, make it serve)."""
        self.states.load(name, lambda: self._on_every_replica(c.LOAD, name))

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (under explicit control) and free its bytes on every replica."""
        self.states.unload(name)
        self._on_every_replica(c.UNLOAD, name)

    def warm_up(self) -> None:
        """Every replica warms up (each also warms up when it starts)."""
        self._on_every_replica(c.WARM_UP, None)

    def ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """None while the ingress accepts requests and a replica is running (or none was asked yet)."""
        if not self.states.accepting:
            return "the engine is shutting down"
        if board.routes(*self._deployment) and not self._running():
            return "no engine replica is running (Ray is starting them)"
        return None

    def tiers(self) -> list[TierUsage]:
        """Every replica's tiers, named ``<replica id>/<tier>``."""
        out: list[TierUsage] = []
        for replica, value in self._ask_every_replica(c.TIERS, None, CONTROL_SECONDS):
            if not isinstance(value, BaseException):
                out += [
                    TierUsage(f"{replica}/{t.name}", t.used_bytes, t.budget_bytes, t.per_model) for t in value
                ]
        return out

    # -- inference ------------------------------------------------------------------------------------

    async def _send_encoder(
        self, model: str, ids: list[list[int]], options: InferenceOptions, *, classify: bool
    ) -> Any:
        op = c.CLASSIFY if classify else c.EMBED
        return await self._ask(c.ReplicaCall(op, model, ids, options, deadline=self._deadline(options)))

    def _deadline(self, options: InferenceOptions) -> float:
        """The request's deadline as ``time.time()`` (the router's slack; replicas count their own)."""
        if options.timeout_us:
            return time.time() + options.timeout_us / 1e6
        return time.time() + self._defaults.timeout_s(request_class(options.priority))

    def _timeout(self, call: c.ReplicaCall) -> float:
        if call.deadline is None:
            return CONTROL_SECONDS
        return max(call.deadline - time.time(), 0.0) + self._grace

    # -- forwarding -----------------------------------------------------------------------------------

    async def _ask(self, call: c.ReplicaCall) -> Any:
        """Send ``call`` to the replica the router picks; its value, or its error raised here."""
        response = self._handle.options(multiplexed_model_id=call.model or "").call.remote(call)
        try:
            answer = await asyncio.wait_for(_awaited(response), self._timeout(call))
        except asyncio.TimeoutError:
            response.cancel()
            raise DeadlineExceeded(_late(call, self._timeout(call))) from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away: the replica cancels the engine request
            raise
        except ray.exceptions.RayError as exc:
            raise _replica_error(exc) from None
        return _settled(answer)

    async def _generate(
        self, model: str, ids: str | Sequence[int], params: GenerationParams, options: InferenceOptions
    ) -> Generation:
        call = c.ReplicaCall(c.GENERATE, model, ids, options, params, deadline=self._deadline(options))
        stream = self._handle.options(stream=True, multiplexed_model_id=model).generate.remote(call)
        items = stream.__aiter__()
        try:
            first = await asyncio.wait_for(items.__anext__(), self._timeout(call))
        except asyncio.TimeoutError:
            stream.cancel()
            raise DeadlineExceeded(_late(call, self._timeout(call))) from None
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except StopAsyncIteration:
            raise WorkerError("a replica ended a generation stream without an answer") from None
        except ray.exceptions.RayError as exc:
            raise _replica_error(exc) from None
        if isinstance(first, c.Answer):
            _settled(first)  # raises its error
            raise WorkerError("a replica answered a generation before starting it")
        board.record(first.state)
        generation = Generation(first.prompt_tokens)
        pump = asyncio.ensure_future(self._pump(items, generation))
        loop = asyncio.get_running_loop()

        def on_done(future: Future[Any]) -> None:
            if future.cancelled():  # the client went away: stop the replica's generation too
                loop.call_soon_threadsafe(pump.cancel)
                loop.call_soon_threadsafe(stream.cancel)

        generation.future.add_done_callback(on_done)
        return generation

    async def _pump(self, items: AsyncIterator[Any], generation: Generation) -> None:
        """Feed a started stream's chunks into ``generation``; settle it with the answer or an error."""
        try:
            while True:
                item = await asyncio.wait_for(items.__anext__(), self._stream_idle)
                if isinstance(item, GenerationChunk):
                    generation.push(item)
                    continue
                if isinstance(item, c.Answer):
                    _settle(generation.future, lambda answer=item: _settled(answer))
                    return
        except asyncio.CancelledError:
            return
        except StopAsyncIteration:
            error: Exception = WorkerError("a replica ended a generation stream without an answer")
        except asyncio.TimeoutError:
            error = DeadlineExceeded(f"the replica sent nothing for {self._stream_idle:g} s")
        except ray.exceptions.RayError as exc:
            error = _replica_error(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: answered as a 500
            error = exc

        def fail() -> Any:
            raise error

        _settle(generation.future, fail)

    # -- every replica (from threads: load, unload, tiers, metrics) -----------------------------------

    def _running(self) -> list[str]:
        return board.running_replicas(*self._deployment)

    def _replica_ids(self, wait_s: float = 10.0) -> list[str]:
        """The running replicas' ids; the first time, asks one replica (which creates the router) and
        waits up to ``wait_s`` for the expected number to show up. Empty under Ray's default router
        (``router="ray"``, the benchmark's baseline), which cannot address one replica."""
        ids = self._running()
        if len(ids) >= self._replicas:
            return ids
        if not ids:
            with contextlib.suppress(Exception):  # none is up yet: the wait below says so
                self._blocking_ask(c.ReplicaCall(c.STATE), wait_s)
        if not board.routes(*self._deployment):
            return []
        deadline = time.monotonic() + wait_s
        while len(ids := self._running()) < self._replicas and time.monotonic() < deadline:
            time.sleep(0.05)
        return ids

    def _blocking_ask(self, call: c.ReplicaCall, timeout: float) -> Any:
        """``_ask`` for a thread with no event loop (sync handle calls)."""
        if _in_event_loop():  # sync handle calls are refused on a loop: make one on a helper thread
            return self._blocking.submit(self._blocking_ask, call, timeout).result()
        response = self._handle.options(multiplexed_model_id=call.model or "").call.remote(call)
        try:
            return _settled(response.result(timeout_s=timeout))
        except TimeoutError:
            response.cancel()
            raise DeadlineExceeded(_late(call, timeout)) from None
        except ray.exceptions.RayError as exc:
            raise _replica_error(exc) from None

    def _ask_every_replica(self, op: str, model: str | None, timeout: float) -> list[tuple[str, Any]]:
        """One call to every running replica at once: (replica id, its value or error) each."""
        if _in_event_loop():
            return self._blocking.submit(self._ask_every_replica, op, model, timeout).result()
        ids = self._replica_ids()
        futures = [
            self._blocking.submit(self._blocking_ask, c.ReplicaCall(op, model, target=rid), timeout)
            for rid in ids
        ]
        out: list[tuple[str, Any]] = []
        for rid, future in zip(ids, futures, strict=True):
            try:
                out.append((rid, future.result()))
            except Exception as exc:  # noqa: BLE001 - reported per replica
                out.append((rid, exc))
        return out

    def _on_every_replica(self, op: str, model: str | None) -> None:
        """Run one call on every running replica; raise the first error (NotReady when none runs)."""
        answers = self._ask_every_replica(op, model, CONTROL_SECONDS)
        if not answers:
            raise NotReady(f"cannot {op.replace('_', ' ')}: no engine replica is running")
        for _, value in answers:
            if isinstance(value, BaseException):
                raise value

    def _replica_metrics(self) -> Snapshot:
        answers = self._ask_every_replica(c.METRICS, None, METRICS_SECONDS)
        return [(rid, value) for rid, value in answers if not isinstance(value, BaseException)]

    def _own_metrics(self) -> Iterable[Metric]:
        states = {rid: board.state(rid) for rid in self._running()}
        return worker_families(
            [
                WorkerVitals(rid, True, s.pid if s else None, s.in_flight if s else 0, 0)
                for rid, s in states.items()
            ]
        )

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting requests (the replicas are Ray's: ``serve.shutdown`` or ``serve delete`` ends
        them, each closing its engine)."""
        self.states.accepting = False
        self._preparers.shutdown(wait=False, cancel_futures=True)
        self._blocking.shutdown(wait=False, cancel_futures=True)


def _dtype(settings: EngineSettings) -> str:
    """The replicas' compute dtype, as the ingress can tell it (``auto`` resolved for the replicas' device
    where this node has one, else for the CPU: it only labels model metadata here)."""
    if settings.dtype != "auto":
        return settings.dtype
    try:
        device = resolve_device(settings.device)
    except Exception:  # noqa: BLE001 - the ingress's node may lack the replicas' device
        device = resolve_device("cpu")
    return dtype_name(resolve_dtype("auto", device))


async def _awaited(response: Any) -> Any:
    return await response


def _settled(answer: Any) -> Any:
    """The value of a replica's ``Answer`` (its error raised as the same ``ptmserve.errors`` type)."""
    if not isinstance(answer, c.Answer):
        raise WorkerError(f"a replica answered {type(answer).__name__}, not an Answer")
    board.record(answer.state)
    if answer.error is not None:
        raise answer.error.rebuild(f"replica {answer.state.replica} (pid {answer.state.pid})")
    return answer.value


def _replica_error(exc: ray.exceptions.RayError) -> Exception:
    """A Ray failure as the error table's type: a replica that died or cannot be reached is NotReady
    (503); an error raised inside a replica (a bug) is a WorkerError (500)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc, ray.exceptions.RayActorError):
        return WorkerError(f"a replica failed: {type(exc).__name__}")
    logger.warning("a replica failed while serving a request: %s", str(exc).splitlines()[0][:200])
    return NotReady(
        f"the engine replica serving this request died or cannot be reached ({type(exc).__name__}); "
        "Ray starts a new one, the other replicas carry on"
    )


def _late(call: c.ReplicaCall, waited: float) -> str:
    what = f"model {call.model!r}" if call.model else call.op
    return f"no engine replica answered the request for {what} within {waited:.1f} s"


def _settle(future: Future[Any], produce: Callable[[], Any]) -> None:
    """Set ``future`` from ``produce()`` (its value, or what it raises), unless it was cancelled."""
    with contextlib.suppress(InvalidStateError):
        try:
            value = produce()
        except BaseException as exc:  # noqa: BLE001 - handed to the future
            future.set_exception(exc)
            return
        future.set_result(value)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
