"""The pool's metrics: every worker's engine counters, read from the workers when asked.

``PoolMetrics`` offers what the server reads of an in-process engine's ``EngineMetrics``:

- ``registry.collect()`` (what ``/metrics`` renders): each worker's metric families with a ``worker``
  label added to every sample, merged by family, plus the pool's own families about its workers
  (``ptmserve_worker_up``, ``ptmserve_worker_pid``, ``ptmserve_worker_in_flight``,
  ``ptmserve_worker_restarts``);
- ``queue_seconds``, ``compute_seconds`` and ``batch_size`` (what the statistics extension reads): those
  histograms summed over the workers, with the labels an engine gives them.

Nothing is pushed: one ``collect()`` asks every live worker for its families (a round trip of about a
millisecond each, in parallel). The summed views reuse a snapshot younger than ``SNAPSHOT_SECONDS``, so
that one statistics answer, which reads three histograms per model, asks the workers once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

SNAPSHOT_SECONDS = 0.05

# (worker label, that worker's metric families)
Snapshot = list[tuple[str, list[Metric]]]


class PoolMetrics:
    """Merged engine metrics of a pool's workers (see the module docstring)."""

    def __init__(self, fetch: Callable[[], Snapshot], own: Callable[[], Iterable[Metric]]) -> None:
        """
        Args:
            fetch: every live worker's families, asked for now.
            own: the pool's families about its workers.
        """
        self._fetch = fetch
        self._lock = threading.Lock()
        self._snapshot: tuple[float, Snapshot] | None = None
        self.registry = _Merged(self._fresh, own)
        self.queue_seconds = _Summed(self._recent, "ptmserve_queue_seconds")
        self.compute_seconds = _Summed(self._recent, "ptmserve_compute_seconds")
        self.batch_size = _Summed(self._recent, "ptmserve_batch_size")

    def _fresh(self) -> Snapshot:
        snapshot = self._fetch()
        with self._lock:
            self._snapshot = (time.monotonic(), snapshot)
        return snapshot

    def _recent(self) -> Snapshot:
        with self._lock:
            cached = self._snapshot
        if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_SECONDS:
            return cached[1]
        return self._fresh()


class _Merged:
    """A collector (what ``prometheus_client.generate_latest`` reads) over every worker's families."""

    def __init__(self, fetch: Callable[[], Snapshot], own: Callable[[], Iterable[Metric]]) -> None:
        self._fetch = fetch
        self._own = own

    def collect(self) -> Iterator[Metric]:
        yield from label_workers(self._fetch())
        yield from self._own()


class _Summed:
    """One histogram family summed over the workers: its ``collect()`` is an engine histogram's."""

    def __init__(self, fetch: Callable[[], Snapshot], name: str) -> None:
        self._fetch = fetch
        self._name = name

    def collect(self) -> list[Metric]:
        return [sum_workers(self._fetch(), self._name)]


def label_workers(snapshot: Snapshot) -> list[Metric]:
    """Every family of every worker, merged by name, each sample labelled with its worker."""
    merged: dict[str, Metric] = {}
    for worker, families in snapshot:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            into.samples.extend(s._replace(labels={**s.labels, "worker": worker}) for s in family.samples)
    return list(merged.values())


def sum_workers(snapshot: Snapshot, name: str) -> Metric:
    """Family ``name`` with each sample (by name and labels) summed over the workers."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    out: Metric | None = None
    for _, families in snapshot:
        for family in families:
            if family.name != name:
                continue
            if out is None:
                out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen = totals.get(key)
                totals[key] = s if seen is None else seen._replace(value=seen.value + s.value)
    if out is None:
        return Metric(name, "", "histogram")
    out.samples.extend(totals.values())
    return out


@dataclass(frozen=True, slots=True)
class WorkerVitals:
    """What the pool itself reports of one worker."""

    worker: str  # its slot, as the ``worker`` label
    up: bool
    pid: int | None  # None while it starts
    in_flight: int
    restarts: int


def worker_families(workers: Sequence[WorkerVitals]) -> list[Metric]:
    """The pool's own families about its workers."""
    by_worker = ["worker"]
    up = GaugeMetricFamily("ptmserve_worker_up", "1 while the engine worker serves.", labels=by_worker)
    pid = GaugeMetricFamily("ptmserve_worker_pid", "Process id of the engine worker.", labels=by_worker)
    in_flight = GaugeMetricFamily(
        "ptmserve_worker_in_flight", "Requests sent to the engine worker, not yet answered.", labels=by_worker
    )
    restarts = CounterMetricFamily(
        "ptmserve_worker_restarts", "Engine workers started again after one ended.", labels=by_worker
    )
    for w in workers:
        up.add_metric([w.worker], 1.0 if w.up else 0.0)
        if w.pid is not None:
            pid.add_metric([w.worker], float(w.pid))
        in_flight.add_metric([w.worker], float(w.in_flight))
        restarts.add_metric([w.worker], float(w.restarts))
    return [up, pid, in_flight, restarts]
