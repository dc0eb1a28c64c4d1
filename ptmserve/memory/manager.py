"""The weight manager: the one object the engine asks for a model's weights.

``acquire(model)`` returns a ``LoadedModel`` whose ``run`` computes a batch. If the model is not on the
device, acquire starts (or joins: loads are single-flight) a load from the host tier or the repository
and, with pipelining, returns at once: ``run`` then waits for each layer group just before computing
it. Bytes are accounted per tier against hard budgets; room is made by evicting idle models in the
order the policy gives. A model that is acquired (work in flight) or loading is never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import torch

from ptmserve import errors
from ptmserve.memory.cache import TensorCache, TensorSpec
from ptmserve.memory.copy import make_copy_engine
from ptmserve.memory.loader import LoadJob, ModelRecord, plan_load
from ptmserve.memory.policy import DEVICE, HOST, EvictionPolicy, LruPolicy
from ptmserve.memory.records import MemoryEvent, Residency, TierStats, TierUsage
from ptmserve.memory.sizes import format_size, parse_size
from ptmserve.memory.skeleton import Skeleton, SkeletonPool
from ptmserve.models.config import Pooling
from ptmserve.models.encoder import GROUP_EMBEDDINGS, GROUP_HEAD, Encoder, EncoderOutput
from ptmserve.models.packed import PackedBatch
from ptmserve.store.manifest import ModelManifest, torch_dtype
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

Listener = Callable[[MemoryEvent], None]


class _NoRoom(Exception):
    """Room could not be made without waiting (prefetch gives up instead of blocking)."""


class LoadedModel:
    """A model acquired for computing; release it (or leave the ``with`` block) when done.

    ``encoder`` is a skeleton bound to this model's device tensors for as long as it is acquired;
    with pipelining its later groups may still be loading (``run`` waits per group; ``wait`` waits
    for all).
    """

    def __init__(self, manager: WeightManager, record: ModelRecord, job: LoadJob, skeleton: Skeleton) -> None:
        self.name = record.name
        self.manifest: ModelManifest = record.manifest
        self.pooling: Pooling = record.pooling  # the model's own pooling, used when run() gets none
        self._manager = manager
        self._record = record
        self._job = job
        self._skeleton: Skeleton | None = skeleton

    @property
    def encoder(self) -> Encoder:
        if self._skeleton is None:
            raise errors.NotReady(f"model {self.name!r} was released")
        return self._skeleton.encoder

    def wait(self) -> None:
        """Block until every tensor is on the device. Raises the load's error if it failed."""
        self._job.done.wait()

    def run(
        self, batch: PackedBatch, pooling: Pooling | None = None, *, classify: bool = False
    ) -> EncoderOutput:
        """Compute ``batch`` group by group, each as soon as its weights are on the device.

        Returns the same values as ``Encoder.forward`` on a freshly loaded model; logits only when
        ``classify``.

        Raises:
            errors.InvalidInput: ``classify`` on a model without a classification head.
            errors.CorruptData / errors.NotReady: the load of this model failed.
        """
        enc = self.encoder
        if classify and enc.head is None:
            raise errors.InvalidInput(f"model {self.name!r} has no classification head")
        job = self._job
        with torch.inference_mode():
            job.wait_group(GROUP_EMBEDDINGS)
            hidden = enc.embed(batch)  # (T, H)
            for i in range(len(enc.layers)):
                job.wait_group(f"layers.{i}")
                hidden = enc.run_layer(i, hidden, batch)
            logits = None
            if classify:
                job.wait_group(GROUP_HEAD)
                logits = enc.classify(hidden, batch)  # (B, C)
            embeddings = enc.pool(hidden, batch, pooling or self.pooling)  # (B, H)
        return EncoderOutput(embeddings=embeddings, logits=logits)

    def release(self) -> None:
        """End this acquisition; the model becomes evictable when nobody else holds it. Idempotent."""
        skeleton, self._skeleton = self._skeleton, None
        if skeleton is not None:
            self._manager._release(self._record, skeleton)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class WeightManager:
    """Host and device weight tiers with byte budgets, skeletons, and pipelined single-flight loads.

    Args:
        repo: where models are stored.
        device: where models compute ("cpu" keeps a separate device region that weights are copied into).
        dtype: dtype floating tensors are held in on the device (None: as stored).
        host_budget: bytes of the host tier (int or a size such as "2GiB"); must hold a model's tensors.
        device_budget: bytes of the device tier; a model larger than this is refused.
        pipelined: let ``acquire`` return before the load ends (compute then waits group by group).
        policy: eviction order; LRU by default.
        verify: check tensors against their sha256 when read from disk.
        wait_timeout: seconds an acquire waits for models in use to be released when it needs room.
        listeners: called with every MemoryEvent (on the thread that caused it; must be quick).
        loader_threads: loads that can run at once.
    """

    def __init__(
        self,
        repo: Repository,
        *,
        device: torch.device | str,
        dtype: torch.dtype | str | None,
        host_budget: int | str,
        device_budget: int | str,
        pipelined: bool = True,
        policy: EvictionPolicy | None = None,
        verify: bool = True,
        wait_timeout: float = 60.0,
        listeners: Sequence[Listener] = (),
        loader_threads: int = 2,
    ) -> None:
        self._repo = repo
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
        self.pipelined = pipelined
        self._policy: EvictionPolicy = policy or LruPolicy()
        self._verify = verify
        self._wait_timeout = wait_timeout
        self._listeners = list(listeners)
        pinned = self.device.type == "cuda"
        self._host = TensorCache(
            HOST, parse_size(host_budget), lambda s, d: torch.empty(s, dtype=d, pin_memory=pinned)
        )
        self._dev = TensorCache(
            DEVICE, parse_size(device_budget), lambda s, d: torch.empty(s, dtype=d, device=self.device)
        )
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._models: dict[str, ModelRecord] = {}
        self._events: list[MemoryEvent] = []
        self._delivery = threading.RLock()  # events reach listeners in order, one thread at a time
        self._skeletons = SkeletonPool()
        self._copier = make_copy_engine(self.device)
        self._executor = ThreadPoolExecutor(loader_threads, thread_name_prefix="ptmserve-load")

    # ------------------------------------------------------------------------------- public API

    def acquire(self, model: str) -> LoadedModel:
        """Pin ``model`` and return it ready to ``run``, starting or joining its load if needed.

        With pipelining this returns before all groups are on the device; otherwise after.

        Raises:
            errors.ModelNotFound: no such model.
            errors.BudgetExceeded: the model does not fit a tier even when that tier is empty.
            errors.NotReady: room could not be made within ``wait_timeout`` (everything else is in
                use), or (unpipelined) the load failed.
            errors.CorruptData: (unpipelined) a stored tensor of the model is missing or damaged.
        """
        record = self._record(model)
        skeleton = self._skeletons.checkout(record.config)
        try:
            if not record.checked:
                skeleton.check(model, {n: s.shape for n, s in record.device_specs.items()})
                record.checked = True
            with self._cond:
                job = record.device_job or self._start_device_load(record, wait=True)
                record.pins += 1
                self._policy.touch(model)
            skeleton.bind(model, job.params)
        except BaseException:
            self._skeletons.checkin(skeleton)
            raise
        finally:
            self._flush_events()
        loaded = LoadedModel(self, record, job, skeleton)
        if not self.pipelined:
            try:
                loaded.wait()
            except BaseException:
                loaded.release()
                raise
        return loaded

    def prefetch(self, model: str, *, tier: str = DEVICE) -> bool:
        """Start loading ``model`` into ``tier`` in the background without pinning it.

        Returns True if it is resident or loading there, False if room could not be made without
        waiting for models in use (the prefetch is then skipped). Never blocks on I/O.

        Raises:
            errors.ModelNotFound, errors.BudgetExceeded: as ``acquire``.
        """
        record = self._record(model)
        try:
            with self._cond:
                self._policy.touch(model)
                if tier == DEVICE and record.device_job is None:
                    self._start_device_load(record, wait=False)
                elif tier == HOST and record.host_job is None and not self._on_host(record):
                    self._start_host_load(record)
            return True
        except _NoRoom:
            return False
        finally:
            self._flush_events()

    def evict(self, model: str, *, host: bool = False) -> bool:
        """Drop ``model`` from the device tier (and from the host tier with ``host``).

        Returns False, evicting nothing, if the model is acquired or loading; else whether anything
        was resident.
        """
        with self._cond:
            record = self._models.get(model)
            if record is None or record.pins or record.jobs:
                return False
            if record.device_job is not None and not record.device_job.done.is_set():
                return False  # still publishing its load
            evicted = record.device_job is not None or (host and bool(self._host.entries_of(model)))
            if record.device_job is not None:
                self._evict(record, DEVICE)
            if host and self._host.entries_of(model):
                self._evict(record, HOST)
            self._cond.notify_all()
        self._flush_events()
        return evicted

    def residency(self, model: str) -> Residency:
        """Where ``model``'s weights are now (all False for a model never used)."""
        with self._lock:
            record = self._models.get(model)
            if record is None:
                return Residency(on_device=False, on_host=False, loading=False)
            loading = record.host_job is not None or (
                record.device_job is not None and not record.device_job.done.is_set()
            )
            return Residency(record.device_ready(), self._on_host(record), loading)

    def stats(self) -> TierStats:
        """Accounted bytes and budgets of both tiers, and bytes per model."""
        with self._lock:
            return TierStats(self._usage(self._host), self._usage(self._dev), self._skeletons.built)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every later MemoryEvent."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Wait for loads in flight and stop the loader and copy threads."""
        self._executor.shutdown(wait=True)
        self._copier.close()

    # -------------------------------------------------------------------------------- internals

    def _record(self, model: str) -> ModelRecord:
        manifest = self._repo.manifest(model)  # cached by the repository; re-read when re-imported
        with self._cond:
            record = self._models.get(model)
            if record is not None and record.manifest is not manifest and not (record.pins or record.jobs):
                for tier in (DEVICE, HOST):
                    self._evict(record, tier)
                record = None
            if record is None:
                record = ModelRecord.from_manifest(manifest, self.dtype)
                self._models[model] = record
            return record

    def _release(self, record: ModelRecord, skeleton: Skeleton) -> None:
        self._skeletons.checkin(skeleton)
        with self._cond:
            record.pins -= 1
            self._cond.notify_all()

    def _start_device_load(self, record: ModelRecord, *, wait: bool) -> LoadJob:
        """Claim the model's bytes in both tiers (evicting, maybe waiting) and start its load.
        Called with the lock held; the lock is only released while waiting for room."""
        name = record.name
        dspecs = record.unique(record.device_specs)
        self._check_fits(record, self._dev, sum(s.nbytes for s in dspecs))
        hkey = {record.device_specs[n].key: s for n, s in record.host_specs.items()}
        retained_host: list = []
        deadline = time.monotonic() + self._wait_timeout
        try:
            while True:
                self._dev.retain(name, [s.key for s in dspecs])  # others' evictions cannot free these
                missing = [s for s in dspecs if self._dev.get(s.key) is None]
                hspecs = list({hkey[s.key].key: hkey[s.key] for s in missing}.values())
                self._check_fits(record, self._host, sum(s.nbytes for s in hspecs))
                retained_host += self._host.retain(name, [s.key for s in hspecs])
                if self._make_room(name, missing, hspecs, deadline, wait):
                    break
            dev_entries, dev_created = self._dev.claim(name, dspecs)
            host_entries, host_created = self._host.claim(name, hspecs)
        except BaseException:
            self._dev.release(name)
            self._host.release(name, retained_host)
            raise
        job = plan_load(record, host_entries, host_created, dev_entries, dev_created)
        record.device_job = job
        self._submit(record, job, DEVICE)
        return job

    def _start_host_load(self, record: ModelRecord) -> None:
        hspecs = record.unique(record.host_specs)
        self._check_fits(record, self._host, sum(s.nbytes for s in hspecs))
        added = self._host.retain(record.name, [s.key for s in hspecs])
        try:
            self._make_room(record.name, [], hspecs, time.monotonic(), wait=False)
            host_entries, host_created = self._host.claim(record.name, hspecs)
        except BaseException:
            self._host.release(record.name, added)
            raise
        record.host_job = plan_load(record, host_entries, host_created, None, [])
        self._submit(record, record.host_job, HOST)

    def _check_fits(self, record: ModelRecord, cache: TensorCache, nbytes: int) -> None:
        if nbytes > cache.budget:
            raise errors.BudgetExceeded(
                f"model {record.name!r} needs {format_size(nbytes)} in the {cache.name} tier, "
                f"more than its whole budget of {format_size(cache.budget)}"
            )

    def _make_room(
        self, name: str, dspecs: list[TensorSpec], hspecs: list[TensorSpec], deadline: float, wait: bool
    ) -> bool:
        """Evict until both claims fit; True when they do, False after waiting (the caller re-plans,
        since entries may have come or gone while the lock was released)."""
        for cache, specs in ((self._dev, dspecs), (self._host, hspecs)):
            while cache.shortfall(specs):
                victim = self._victim(cache, name)
                if victim is None:
                    break
                self._evict(self._models[victim], cache.name)
        short = {c.name: c.shortfall(s) for c, s in ((self._dev, dspecs), (self._host, hspecs))}
        if not any(short.values()):
            return True
        remaining = deadline - time.monotonic()
        if not wait:
            raise _NoRoom()
        if remaining <= 0:
            busy = sorted(m.name for m in self._models.values() if m.pins or m.jobs)
            raise errors.NotReady(
                f"no room for model {name!r}: short of "
                + ", ".join(f"{format_size(n)} in the {t} tier" for t, n in short.items() if n)
                + f" after {self._wait_timeout:g} s, held by models in use {busy}"
            )
        self._cond.wait(remaining)
        return False

    def _victim(self, cache: TensorCache, exclude: str) -> str | None:
        if cache is self._dev:
            ready = [m for m in self._models.values() if m.device_ready() and not m.pins]
        else:
            held = [self._models[n] for n in cache.models() if n in self._models]
            ready = [m for m in held if not m.jobs]
        candidates = [m.name for m in ready if m.name != exclude]
        victim = self._policy.victim(cache.name, candidates)
        return victim if victim in candidates else None

    def _evict(self, record: ModelRecord, tier: str) -> None:
        cache = self._dev if tier == DEVICE else self._host
        freed = cache.release(record.name)
        if tier == DEVICE:
            record.device_job = None
        logger.debug("evicted %s from the %s tier (%d bytes freed)", record.name, tier, freed)
        self._events.append(MemoryEvent("evict", record.name, tier, nbytes=freed))
        if record.device_job is None and not self._host.entries_of(record.name):
            self._policy.forget(record.name)

    def _submit(self, record: ModelRecord, job: LoadJob, tier: str) -> None:
        record.jobs += 1
        self._executor.submit(self._run_job, record, job, tier)

    def _run_job(self, record: ModelRecord, job: LoadJob, tier: str) -> None:
        """Loader thread: execute ``job``, publish its outcome, then tell listeners and waiters
        (in that order, so whoever waits on ``done`` sees the events already delivered)."""
        try:
            job.execute(self._repo, self._copier, verify=self._verify)
        except errors.PtmError as exc:
            logger.error("loading model %s failed: %s", record.name, exc.message)
            with self._cond:
                for cache, entries in ((self._host, job.owned_host), (self._dev, job.owned_device)):
                    for entry in entries:
                        if entry.ready.error is not None:
                            cache.drop(entry)  # never offer bad bytes to another load
                if tier == DEVICE:
                    self._dev.release(record.name)
                    record.device_job = None
                if record.jobs == 1:  # another load of this model may still be filling host entries
                    self._host.release(record.name)
                self._finish(record, job, tier)
                self._events.append(MemoryEvent("load_failed", record.name, tier, error=exc.message))
            self._flush_events()
            job.done.fail(exc)
        else:
            seconds = time.perf_counter() - job.started
            with self._cond:
                self._finish(record, job, tier)
                if job.bytes_read:
                    self._events.append(MemoryEvent("load", record.name, HOST, job.bytes_read, seconds))
                if tier == DEVICE:
                    self._events.append(MemoryEvent("load", record.name, DEVICE, job.bytes_copied, seconds))
            self._flush_events()
            job.done.set()

    def _finish(self, record: ModelRecord, job: LoadJob, tier: str) -> None:
        record.jobs -= 1
        if tier == HOST and record.host_job is job:
            record.host_job = None
        self._cond.notify_all()

    def _on_host(self, record: ModelRecord) -> bool:
        return self._host.holds_all(record.name, {s.key for s in record.host_specs.values()})

    def _usage(self, cache: TensorCache) -> TierUsage:
        return TierUsage(
            name=cache.name,
            used_bytes=cache.used_bytes,
            budget_bytes=cache.budget,
            free_list_bytes=cache.free_bytes,
            allocations=cache.allocations,
            per_model={m: cache.model_bytes(m) for m in cache.models()},
        )

    def _flush_events(self) -> None:
        """Deliver queued events; when this returns, every event queued before the call was delivered
        (by this thread or by the one that was delivering)."""
        with self._delivery:
            with self._lock:
                events, self._events = self._events, []
            for event in events:
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:
                        logger.exception("memory event listener failed on %s", event)
