"""``EngineReplica``: one ptmserve ``Engine`` inside a Ray Serve replica.

The ingress (``frontend.py``) has already checked and tokenized every request; a replica only computes,
as a worker of ``serve --workers N`` does (``engine/pool/process.py``): ``call`` runs embeddings,
classification and control calls, ``generate`` streams a generation. Each answer carries the replica's
``ReplicaState`` (its device and host tiers, requests in flight, service and load times); the same state
is its Ray routing stats. ``check_health`` fails once the engine cannot serve, so Ray replaces the
replica.

``multiplexed_replica(n)`` is the benchmark's baseline: the same engine behind a plain
``@serve.multiplexed(max_num_models_per_replica=n)`` loader, routed by Ray Serve's default router.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.engine.pool.messages import ErrorRecord
from ptmserve.errors import PtmError
from ptmserve.ray import calls as c
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

EWMA = 0.2  # weight of the newest request in ``seconds_per_request``
UNAVAILABLE_SECONDS = 1.0  # how often the state re-reads which models the engine refuses


class EngineReplica:
    """Serves ``ReplicaCall``s with one engine over the repository at ``repo``."""

    def __init__(self, repo: str, settings: EngineSettings, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        logging.getLogger("ptmserve").setLevel(logging.INFO)
        self.engine = Engine(Repository(repo), settings)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Ray Serve (unit use): name it after the process
            self.replica_id = f"pid-{os.getpid()}"
        self._in_flight = 0
        self._busy = 0.0  # seconds with at least one request in flight, up to ``_since``
        self._since = time.monotonic()
        self._busy_at_last_finish = 0.0
        self._spr = 0.0
        self._unavailable: dict[str, str] = {}
        self._unavailable_at = -UNAVAILABLE_SECONDS
        self._handlers = {
            c.EMBED: lambda call: self.engine.aembed(call.model, call.inputs, call.options),
            c.CLASSIFY: lambda call: self.engine.aclassify(call.model, call.inputs, call.options),
            c.LOAD: lambda call: asyncio.to_thread(self.engine.load, call.model),
            c.UNLOAD: lambda call: asyncio.to_thread(self.engine.unload, call.model),
            c.WARM_UP: lambda call: asyncio.to_thread(self.engine.warm_up),
            c.METRICS: lambda call: _async(list(self.engine.metrics.registry.collect())),
            c.TIERS: lambda call: _async(self.engine.tiers()),
            c.STATE: lambda call: _async(None),
            c.WARM_HOST: lambda call: asyncio.to_thread(self._warm_host),
        }
        logger.info("replica %s (pid %d) serving with %d thread(s)", self.replica_id, os.getpid(), threads)

    # -- state ----------------------------------------------------------------------------------------

    def _tick(self, delta: int) -> None:
        """Account busy time, then change the count of requests in flight by ``delta``."""
        now = time.monotonic()
        if self._in_flight > 0:
            self._busy += now - self._since
        self._since = now
        self._in_flight += delta
        if delta < 0:  # one finished: its share of the busy time since the previous one
            spent = self._busy - self._busy_at_last_finish
            self._busy_at_last_finish = self._busy
            self._spr = spent if self._spr == 0 else (1 - EWMA) * self._spr + EWMA * spent

    def state(self) -> c.ReplicaState:
        """This replica now (sent with every answer: kept cheap)."""
        tiers = {t.name: t for t in self.engine.tiers()}
        device_tier = tiers["device"]
        device = frozenset(self.engine.weights.resident_models())
        host = frozenset(tiers["host"].per_model) - device
        loads = _total(self.engine.metrics.loads)
        seconds = _total(self.engine.metrics.load_seconds)
        now = time.monotonic()
        if now - self._unavailable_at > UNAVAILABLE_SECONDS:  # a model's state changes rarely
            models = self.engine.models()
            self._unavailable = {i.name: i.reason for i in models if i.state.value == "UNAVAILABLE"}
            self._unavailable_at = now
        return c.ReplicaState(
            replica=self.replica_id,
            pid=os.getpid(),
            at=time.time(),
            device=device,
            device_bytes={m: b for m, b in device_tier.per_model.items() if m in device},
            device_free=max(device_tier.budget_bytes - device_tier.used_bytes, 0),
            host=host,
            in_flight=self._in_flight,
            seconds_per_request=self._spr,
            load_seconds=seconds / loads if loads else 0.0,
            loads=int(loads),
            unavailable=self._unavailable,
        )

    def _warm_host(self) -> None:
        """Bring every model into the host tier and wait for it (benchmarks measure device switches)."""
        names = self.engine.catalog.names()
        for name in names:
            self.engine.weights.prefetch(name, tier="host")
        while not all(self.engine.weights.residency(n).on_host for n in names):
            time.sleep(0.05)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's routing stats hook: this replica's ``ReplicaState`` as a dict."""
        return self.state().to_stats()

    def check_health(self) -> None:
        """Ray Serve's health check: raises once the engine cannot serve (Ray then replaces us)."""
        reason = self.engine.unready_reason()
        if reason is not None and self.engine.states.accepting:
            raise RuntimeError(f"the engine cannot serve: {reason}")

    # -- calls ----------------------------------------------------------------------------------------

    async def call(self, call: c.ReplicaCall) -> c.Answer:
        """Run one call; its error comes back in the answer, never raised."""
        counted = call.op in (c.EMBED, c.CLASSIFY)  # control calls are not work routing should weigh
        if counted:
            self._tick(+1)
        try:
            await self._before(call)
            value = await self._handlers[call.op](call)
        except PtmError as exc:
            return c.Answer(self._finish(counted), error=ErrorRecord.of(exc))
        except Exception as exc:
            logger.exception("call %s for %s failed", call.op, call.model)
            return c.Answer(self._finish(counted), error=ErrorRecord.of(exc))
        except BaseException:  # cancelled: the caller went away
            if counted:
                self._tick(-1)
            raise
        return c.Answer(self._finish(counted), value=value)

    async def generate(self, call: c.ReplicaCall) -> AsyncIterator[Any]:
        """A streamed generation: ``Started`` once admitted, then ``GenerationChunk``s, then its
        ``Answer`` (the result, or the error). Cancelled by Ray when the ingress's caller goes away."""
        self._tick(+1)
        generation = None
        try:
            await self._before(call)
            generation = await self.engine.acomplete(call.model, call.inputs, call.params, call.options)
            yield c.Started(generation.prompt_tokens, self.state())
            async for chunk in generation:
                yield chunk
            answer = c.Answer(self._finish(), value=generation.result(timeout=0))
        except PtmError as exc:
            answer = c.Answer(self._finish(), error=ErrorRecord.of(exc))
        except Exception as exc:
            logger.exception("generation for %s failed", call.model)
            answer = c.Answer(self._finish(), error=ErrorRecord.of(exc))
        except BaseException:  # cancelled (the caller went away) or closed: nobody reads an answer
            self._tick(-1)
            raise
        finally:
            if generation is not None:
                generation.cancel()  # a no-op once it finished; frees its KV blocks if the caller left
        yield answer

    async def _before(self, call: c.ReplicaCall) -> None:
        """Hook for subclasses: runs before a call's work (the baseline's multiplexed loader)."""

    def _finish(self, counted: bool = True) -> c.ReplicaState:
        if counted:
            self._tick(-1)
        return self.state()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain_seconds=2.0)


class _Loaded:
    """What the baseline's multiplexed loader returns: a model Ray counts as loaded on this replica.

    When Ray's LRU drops it, nothing is freed here: the engine's own tiers keep managing its bytes (its
    device budget evicts when it must), so the baseline differs from ``EngineReplica`` in routing only."""

    def __init__(self, model: str) -> None:
        self.model = model


def multiplexed_replica(max_models: int) -> type[EngineReplica]:
    """The baseline: ``EngineReplica`` whose inference calls go through a plain
    ``@serve.multiplexed(max_num_models_per_replica=max_models)`` loader that loads the model onto the
    engine's device (``Engine.load``), as Ray Serve's model multiplexing is meant to be used; routed by
    Ray's default router, which prefers replicas that report the model id loaded."""

    class MultiplexedReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> _Loaded:
            await asyncio.to_thread(self.engine.load, model_id)
            return _Loaded(model_id)

        async def _before(self, call: c.ReplicaCall) -> None:
            if call.op in (c.EMBED, c.CLASSIFY, c.GENERATE) and call.model is not None:
                await self.get_model(call.model)

    return MultiplexedReplica


async def _async(value: Any) -> Any:
    return value


def _total(metric: Any) -> float:
    """The sum of a counter's ``_total`` samples over its labels."""
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith("_total"))
