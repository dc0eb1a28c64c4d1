"""The weight manager: the one object the engine asks for a model's weights.

``acquire(model)`` returns a ``LoadedModel`` whose ``run`` computes a batch. If the model is not on the
device, acquire starts (or joins: loads are single-flight) a load from the host tier or the repository
and, with pipelining, returns at once: ``run`` then waits for each layer group just before computing
it. Bytes are accounted per tier against hard budgets; room is made by evicting idle models in the
order the policy gives. A model that is acquired (work in flight) or loading is never evicted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ptmserve import errors
from ptmserve.memory.cache import TensorCache, TensorSpec
from ptmserve.memory.copy import make_copy_engine
from ptmserve.memory.loaded import LoadedModel
from ptmserve.memory.loader import LoadJob, ModelRecord, plan_load
from ptmserve.memory.policy import DEVICE, HOST, EvictionPolicy, LruPolicy
from ptmserve.memory.records import EventQueue, Listener, MemoryEvent, Residency, TierStats
from ptmserve.memory.shared import SharedFiles
from ptmserve.memory.sizes import format_size, parse_size
from ptmserve.memory.skeleton import Skeleton, SkeletonPool
from ptmserve.store.manifest import ModelManifest, torch_dtype
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)


class _NoRoom(Exception):
    """Room could not be made without waiting (prefetch gives up instead of blocking)."""


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
        zero_copy: CPU only: compute straight from the host tier. The two tiers are then one (its
            budget is ``host_budget``; ``device_budget`` is ignored) and models must be stored in the
            serve dtype.
        placement: ``placement(manifest)`` names the load groups of a model that compute from the host
            tier in place (``placement.py``); None: every group on the device. Asked when a model's
            record is made, and again whenever the model is off the device and idle.
        shared_memory: a folder on a tmpfs that holds the host tier as files (``shared.py``), so that
            several processes' managers map the same bytes; None: the host tier is private memory.
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
        zero_copy: bool = False,
        placement: Callable[[ModelManifest], frozenset[str]] | None = None,
        shared_memory: str | os.PathLike[str] | None = None,
    ) -> None:
        self._repo = repo
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
        self.pipelined = pipelined
        self._policy: EvictionPolicy = policy or LruPolicy()
        self.verify = verify  # may be changed between loads
        self._wait_timeout = wait_timeout
        self._events = EventQueue(listeners)  # queued under the lock, delivered outside it
        pinned = self.device.type == "cuda"
        self._placement = placement
        self.shared = SharedFiles(shared_memory) if shared_memory is not None else None
        self._host = TensorCache(
            HOST,
            parse_size(host_budget),
            lambda s, d: torch.empty(s, dtype=d, pin_memory=pinned),
            shared=self.shared,  # on CUDA not pinned: copies from it take the slower path
        )
        self._dev = TensorCache(
            DEVICE, parse_size(device_budget), lambda s, d: torch.empty(s, dtype=d, device=self.device)
        )
        self.zero_copy = zero_copy
        if zero_copy:
            if self.device.type != "cpu":
                raise errors.InvalidConfig(
                    f"zero-copy serving needs the cpu device, not {str(self.device)!r}"
                )
            self._dev = self._host  # one region: "on the device" means bound straight to host tensors
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._models: dict[str, ModelRecord] = {}
        self._skeletons = SkeletonPool()
        self._copier = make_copy_engine(self.device)
        self._executor = ThreadPoolExecutor(loader_threads, thread_name_prefix="ptmserve-load")
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="ptmserve-verify")
        self._closed = False

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
        skeleton = self._skeletons.checkout(record.family, record.config)
        try:
            if not record.checked:
                skeleton.check(model, {n: s.shape for n, s in record.host_specs.items()})
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
            self._events.deliver()
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
                    self._start_host_load(record, bind=False, wait=False)
            return True
        except _NoRoom:
            return False
        finally:
            self._events.deliver()

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
        self._events.deliver()
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

    def resident_models(self) -> frozenset[str]:
        """The models on the device now, ready to run (cheaper than ``stats`` for a hot path)."""
        with self._lock:
            return frozenset(name for name, record in self._models.items() if record.device_ready())

    def device_bytes_needed(self, model: str) -> int:
        """Device bytes a load of ``model`` would add now: its tensors the device tier does not hold
        (tensors shared with resident models cost nothing). 0 when it is resident or loading."""
        record = self._record(model)
        with self._lock:
            if record.device_job is not None:
                return 0
            return sum(s.nbytes for s in record.unique(record.device_specs) if self._dev.get(s.key) is None)

    def placed_bytes(self, model: str) -> int:
        """Device bytes of ``model`` as placed: its device-placed tensors in the serve dtype, each once."""
        record = self._record(model)
        return sum(s.nbytes for s in record.unique(record.device_specs))

    def host_groups(self, model: str) -> frozenset[str]:
        """The load groups of ``model`` that compute from the host tier (its placement now)."""
        return self._record(model).host_groups

    def check_budget(self, model: str) -> None:
        """Raise ``errors.BudgetExceeded`` if ``model`` can never fit a tier, even an empty one
        (for refusing it at startup or import rather than at its first request)."""
        record = self._record(model)
        self._check_fits(record, self._dev, sum(s.nbytes for s in record.unique(record.device_specs)))
        self._check_fits(record, self._host, sum(s.nbytes for s in record.unique(record.host_specs)))

    def trim(self) -> int:
        """Give every free-listed buffer of both tiers back to the allocator; returns the bytes."""
        with self._lock:
            return self._host.trim() + self._dev.trim()

    def stats(self) -> TierStats:
        """Accounted bytes and budgets of both tiers, and bytes per model."""
        with self._lock:
            return TierStats(self._host.usage(), self._dev.usage(), self._skeletons.built)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every later MemoryEvent."""
        self._events.listeners.append(listener)

    def close(self) -> None:
        """Wait for loads in flight and stop the loader and copy threads; later loads raise NotReady."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)
        self._verifier.shutdown(wait=True)
        self._copier.close()
        if self.shared is not None:
            with self._lock:
                self.shared.close()

    # -------------------------------------------------------------------------------- internals

    def _record(self, model: str) -> ModelRecord:
        manifest = self._repo.manifest(model)  # cached by the repository; re-read when re-imported
        placed = frozenset() if self._placement is None or self.zero_copy else self._placement(manifest)
        with self._cond:
            if self._closed:
                raise errors.NotReady("the weight manager is closed")
            record = self._models.get(model)
            idle = record is not None and not (record.pins or record.jobs)
            if record is not None and record.manifest is not manifest and idle:
                if record.device_job is not None:  # re-imported: its old weights are stale
                    self._evict(record, DEVICE)
                if self._host.entries_of(model):
                    self._evict(record, HOST)
                record = None
            elif (
                record is not None and record.placement_asked != placed and idle and record.device_job is None
            ):
                record = None  # placed anew (a profile arrived); its host bytes stay valid
            if record is None:
                record = ModelRecord.from_manifest(manifest, None if self.zero_copy else self.dtype, placed)
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
        if self.zero_copy:
            return self._start_host_load(record, bind=True, wait=wait)
        name = record.name
        dspecs = record.unique(record.device_specs)
        self._check_fits(record, self._dev, sum(s.nbytes for s in dspecs))
        hkey = {d.key: record.host_specs[n] for n, d in record.device_specs.items()}
        # the tensors its host-placed groups compute from, held in the host tier while it is loaded
        in_place = record.in_place_specs()
        retained_host: list = []
        deadline = time.monotonic() + self._wait_timeout
        try:
            while True:
                self._dev.retain(name, [s.key for s in dspecs])  # others' evictions cannot free these
                missing = [s for s in dspecs if self._dev.get(s.key) is None]
                sources = [hkey[s.key] for s in missing] + in_place
                hspecs = list({s.key: s for s in sources}.values())
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

    def _start_host_load(self, record: ModelRecord, *, bind: bool, wait: bool) -> LoadJob:
        """Claim the model's bytes in the host tier and start reading them; with ``bind`` (zero-copy)
        the job is the model's device load too. Called with the lock held."""
        name = record.name
        hspecs = record.unique(record.host_specs)
        self._check_fits(record, self._host, sum(s.nbytes for s in hspecs))
        if (
            bind
            and self.dtype is not None
            and any(s.dtype.is_floating_point and s.dtype != self.dtype for s in hspecs)
        ):
            raise errors.InvalidConfig(
                f"zero-copy serving computes in the stored dtype: model {name!r} is stored in "
                f"{record.manifest.dtype}, the serve dtype is {self.dtype}; re-import it in that dtype"
            )
        added: list = []
        deadline = time.monotonic() + self._wait_timeout
        try:
            while True:
                added += self._host.retain(name, [s.key for s in hspecs])
                if self._make_room(name, [], hspecs, deadline, wait):
                    break
            host_entries, host_created = self._host.claim(name, hspecs)
        except BaseException:
            self._host.release(name, added)
            raise
        job = plan_load(record, host_entries, host_created, None, [])
        if bind:
            record.device_job = job
        else:
            record.host_job = job
        self._submit(record, job, DEVICE if bind else HOST)
        return job

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
        if cache is self._host:  # pinned models computing in place (zero-copy, host-placed groups) stay
            held = [self._models[n] for n in cache.models() if n in self._models]
            ready = [m for m in held if not m.jobs and not (m.pins and self._computes_from_host(m))]
        else:
            ready = [m for m in self._models.values() if m.device_ready() and not m.pins]
        candidates = [m.name for m in ready if m.name != exclude]
        victim = self._policy.victim(cache.name, candidates)
        return victim if victim in candidates else None

    def _computes_from_host(self, record: ModelRecord) -> bool:
        return self.zero_copy or len(record.device_specs) < len(record.host_specs)

    def _evict(self, record: ModelRecord, tier: str) -> None:
        cache = self._dev if tier == DEVICE else self._host
        if (
            tier == HOST
            and record.device_job is not None
            and not self.zero_copy
            and self._computes_from_host(record)
        ):
            self._evict(record, DEVICE)  # its host-placed groups compute from the bytes about to go
        freed = cache.release(record.name)
        if tier == DEVICE or self.zero_copy:
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
            job.execute(self._repo, self._copier, self._verifier if self.verify else None)
        except errors.PtmError as exc:
            logger.error("loading model %s failed: %s", record.name, exc.message)
            with self._cond:  # free the bytes first, so whoever sees the error can reuse them
                for cache, entries in ((self._host, job.owned_host), (self._dev, job.owned_device)):
                    for entry in entries:
                        if not entry.ready.is_set() or entry.ready.error is not None:
                            cache.drop(entry)  # never offer unfilled or bad bytes to another load
                if tier == DEVICE:
                    self._dev.release(record.name)
                    record.device_job = None
                if record.jobs == 1:  # another load of this model may still be filling host entries
                    self._host.release(record.name)
                self._finish(record, job, tier)
                self._events.append(MemoryEvent("load_failed", record.name, tier, error=exc.message))
                job.fail(exc)
            self._events.deliver()
            job.done.fail(exc)
        else:
            seconds = time.perf_counter() - job.started
            with self._cond:
                for entry in job.owned_host:
                    self._host.publish(entry)  # checked: other processes may map it now
                self._finish(record, job, tier)
                if job.bytes_read:
                    self._events.append(MemoryEvent("load", record.name, HOST, job.bytes_read, seconds))
                if tier == DEVICE:
                    self._events.append(
                        MemoryEvent(
                            "load", record.name, DEVICE, job.bytes_copied, seconds, read_bytes=job.bytes_read
                        )
                    )
            self._events.deliver()
            job.done.set()

    def _finish(self, record: ModelRecord, job: LoadJob, tier: str) -> None:
        record.jobs -= 1
        if tier == HOST and record.host_job is job:
            record.host_job = None
        self._cond.notify_all()

    def _on_host(self, record: ModelRecord) -> bool:
        return self._host.holds_all(record.name, {s.key for s in record.host_specs.values()})
