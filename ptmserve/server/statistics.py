"""Per-model statistics for Triton's statistics extension: this server's request counts and times, and
the engine's queue, compute and batch-size figures read from its Prometheus histograms."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Stats:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # inputs served (Triton counts batch elements)
    last_inference_ms: int = 0


class Statistics:
    """This server's inference requests per model (both protocols); thread-safe."""

    def __init__(self) -> None:
        self._models: dict[str, _Stats] = {}
        self._lock = threading.Lock()

    def record(self, model: str, n: int, ok: bool, ns: int) -> None:
        """One request of ``model`` with ``n`` inputs ended (``ok``: it succeeded) after ``ns``."""
        with self._lock:
            st = self._models.setdefault(model, _Stats())
            if ok:
                st.success_count += 1
                st.success_ns += ns
                st.inference_count += n
                st.last_inference_ms = int(time.time() * 1000)
            else:
                st.fail_count += 1
                st.fail_ns += ns

    def body(self, names: list[str], metrics: Any, version: str) -> dict[str, Any]:
        """Triton's statistics extension body for ``names``.

        ``success``, ``fail``, ``inference_count`` and ``last_inference`` are this server's inference
        requests (both protocols; ``ns`` from arrival to answer). ``queue``, ``compute_infer``,
        ``execution_count`` and ``batch_stats`` come from the engine's counters, which see every request
        of the model (HTTP or Python API): ``queue`` per request, from its arrival in the engine to the
        start of its batch; ``compute_infer`` per batch (one model execution), as the engine times
        batches. Input and output copies are inside ``compute_infer``, so ``compute_input`` and
        ``compute_output`` stay zero. ``batch_stats`` has one entry per bucket of the engine's batch-size
        histogram that saw batches: ``batch_size`` is the bucket's upper bound (1, 2, 4, ... requests) and
        ``compute_infer.count`` its batches; the engine does not time batches by size, so their ``ns`` is 0.
        """

        with self._lock:
            snap = {n: dataclasses.replace(self._models.get(n, _Stats())) for n in names}
        zero = {"count": 0, "ns": 0}
        out = []
        for n, st in snap.items():
            engine = engine_model_stats(metrics, n)
            out.append(
                {
                    "name": n,
                    "version": version,
                    "last_inference": st.last_inference_ms,
                    "inference_count": st.inference_count,
                    "execution_count": engine.batches,
                    "inference_stats": {
                        "success": {"count": st.success_count, "ns": st.success_ns},
                        "fail": {"count": st.fail_count, "ns": st.fail_ns},
                        "queue": {"count": engine.queued, "ns": engine.queue_ns},
                        "compute_input": zero,
                        "compute_infer": {"count": engine.batches, "ns": engine.compute_ns},
                        "compute_output": zero,
                    },
                    "batch_stats": [
                        {
                            "batch_size": size,
                            "compute_input": zero,
                            "compute_infer": {"count": count, "ns": 0},
                            "compute_output": zero,
                        }
                        for size, count in engine.batch_sizes
                    ],
                }
            )
        return {"model_stats": out}


@dataclass(frozen=True, slots=True)
class EngineModelStats:
    """One model's figures read from the engine's Prometheus counters."""

    queued: int  # requests that left the queue for a batch
    queue_ns: int  # their total time in the queue
    batches: int  # batches executed
    compute_ns: int  # their total compute time
    batch_sizes: list[tuple[int, int]]  # (bucket upper bound in requests, batches in that bucket)


def engine_model_stats(metrics: Any, model: str) -> EngineModelStats:
    """Read ``model``'s queue, compute and batch-size histograms from an ``EngineMetrics``."""
    queued, queue_s, _ = _histogram(metrics.queue_seconds, model)
    batches, compute_s, buckets = _histogram(metrics.compute_seconds, model)
    _, _, size_buckets = _histogram(metrics.batch_size, model)
    sizes: list[tuple[int, int]] = []
    below = 0
    for bound, cumulative in size_buckets:  # cumulative counts, ascending bounds
        if cumulative > below and math.isfinite(bound):
            sizes.append((int(bound), cumulative - below))
        below = cumulative
    return EngineModelStats(queued, round(queue_s * 1e9), batches, round(compute_s * 1e9), sizes)


def _histogram(hist: Any, model: str) -> tuple[int, float, list[tuple[float, int]]]:
    """(count, sum, cumulative buckets) of one model's child of a labelled Prometheus histogram."""
    count, total, buckets = 0, 0.0, []
    for family in hist.collect():
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), int(sample.value)))
    buckets.sort()
    return count, total, buckets
