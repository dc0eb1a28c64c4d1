"""The worker pool's pure parts, without processes: the routing policy (``engine/pool/routing.py``), errors
crossing the pipe (``messages.ErrorRecord``) and the merged metrics (``engine/pool/metrics.py``).

The pool itself, with real worker processes behind a real server, is tested in
``tests/server/test_workers_real.py``.
"""

from __future__ import annotations

import pickle

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ptmserve import errors
from ptmserve.engine.pool.messages import ErrorRecord, WorkerError
from ptmserve.engine.pool.metrics import PoolMetrics, WorkerVitals, label_workers, worker_families
from ptmserve.engine.pool.routing import WorkerLoad, choose_worker
from ptmserve.server.statistics import engine_model_stats


def worker(
    index: int,
    *,
    live: bool = True,
    in_flight: int = 0,
    device: tuple[str, ...] = (),
    loading: tuple[str, ...] = (),
) -> WorkerLoad:
    return WorkerLoad(index, live, in_flight, frozenset(device), frozenset(loading))


# ------------------------------------------------------------------------------------------- routing


def test_a_request_goes_to_the_worker_whose_device_holds_its_model() -> None:
    workers = [worker(0, device=("a",)), worker(1, device=("b",))]
    assert choose_worker("b", workers) == 1
    assert choose_worker("a", workers) == 0


def test_affinity_beats_load() -> None:
    """The holder takes the request even when busier: a switch on another worker costs more."""
    workers = [worker(0, in_flight=5, device=("a",)), worker(1, in_flight=0)]
    assert choose_worker("a", workers) == 0


def test_among_holders_the_least_loaded_wins() -> None:
    workers = [worker(0, in_flight=3, device=("a",)), worker(1, in_flight=1, device=("a",))]
    assert choose_worker("a", workers) == 1


def test_a_cold_model_goes_where_it_is_already_loading() -> None:
    """Requests for a model no device holds follow the first one: the model is loaded once."""
    workers = [worker(0, in_flight=1, loading=("cold",)), worker(1)]
    assert choose_worker("cold", workers) == 0


def test_a_cold_model_goes_to_the_least_loaded_worker() -> None:
    workers = [
        worker(0, in_flight=2, device=("a",)),
        worker(1, in_flight=1, device=("b",)),
        worker(2, in_flight=4),
    ]
    assert choose_worker("c", workers) == 1


def test_ties_go_to_the_emptiest_device_then_the_lowest_index() -> None:
    assert choose_worker("c", [worker(0, device=("a", "b")), worker(1, device=("a",))]) == 1
    assert choose_worker("c", [worker(0, device=("a",)), worker(1, device=("b",))]) == 0
    assert choose_worker("c", [worker(0), worker(1)]) == 0


def test_dead_workers_are_never_chosen() -> None:
    workers = [worker(0, live=False, device=("a",)), worker(1, in_flight=9)]
    assert choose_worker("a", workers) == 1
    assert choose_worker("a", [worker(0, live=False), worker(1, live=False)]) is None
    assert choose_worker("a", []) is None


# ----------------------------------------------------------------------------- errors across the pipe


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidInput("input[0] is an empty string"),
        errors.ModelNotFound("model 'x' is not in the repository"),
        errors.PayloadTooLarge("too long"),
        errors.Overloaded("queue full"),
        errors.NotReady("model 'x' is not ready"),
        errors.DeadlineExceeded("late"),
        errors.BudgetExceeded("too big"),
    ],
)
def test_a_ptmserve_error_is_rebuilt_as_the_same_type_and_message(error: errors.PtmError) -> None:
    record = pickle.loads(pickle.dumps(ErrorRecord.of(error)))
    rebuilt = record.rebuild("worker 1 (pid 42)")
    assert type(rebuilt) is type(error) and rebuilt.message == error.message  # type: ignore[attr-defined]


def test_any_other_error_names_its_worker() -> None:
    rebuilt = ErrorRecord.of(ZeroDivisionError("division by zero")).rebuild("worker 1 (pid 42)")
    assert isinstance(rebuilt, WorkerError) and not isinstance(rebuilt, errors.PtmError)
    assert str(rebuilt) == "worker 1 (pid 42): ZeroDivisionError: division by zero"
    # a name that happens to be in ptmserve.errors but is not an error class is not trusted
    assert isinstance(ErrorRecord("annotations", "x").rebuild("w"), WorkerError)


# ------------------------------------------------------------------------------------- merged metrics


def engine_registry(model: str, requests: int, seconds: list[float]) -> CollectorRegistry:
    """A registry with two of the engine's families, as a worker's engine would fill them."""
    r = CollectorRegistry()
    Counter("ptmserve_requests", "Requests.", ["model", "outcome"], registry=r).labels(model, "success").inc(
        requests
    )
    hist = Histogram("ptmserve_queue_seconds", "Queue.", ["model"], buckets=(0.1, 1.0), registry=r)
    for s in seconds:
        hist.labels(model).observe(s)
    Histogram("ptmserve_compute_seconds", "Compute.", ["model"], registry=r)
    Histogram("ptmserve_batch_size", "Batch.", ["model"], registry=r)
    return r


def snapshot() -> list:
    """Two workers' families, pickled and unpickled as they cross the pipe."""
    workers = {"0": engine_registry("a", 2, [0.05, 0.5]), "1": engine_registry("a", 3, [0.05])}
    return [(w, pickle.loads(pickle.dumps(list(r.collect())))) for w, r in workers.items()]


def test_metrics_carry_a_worker_label_and_render() -> None:
    pool = PoolMetrics(snapshot, lambda: [])
    text = generate_latest(pool.registry).decode()  # type: ignore[arg-type]
    assert 'ptmserve_requests_total{model="a",outcome="success",worker="0"} 2.0' in text
    assert 'ptmserve_requests_total{model="a",outcome="success",worker="1"} 3.0' in text
    assert text.count("# TYPE ptmserve_requests_total counter") == 1  # one family, samples of both workers


def test_statistics_read_the_histograms_summed_over_workers() -> None:
    stats = engine_model_stats(PoolMetrics(snapshot, lambda: []), "a")
    assert stats.queued == 3 and stats.queue_ns == round(0.6 * 1e9)


def test_label_workers_keeps_each_family_once() -> None:
    names = [f.name for f in label_workers(snapshot())]
    assert len(names) == len(set(names))


def test_the_pool_reports_its_workers() -> None:
    vitals = [WorkerVitals("0", True, 101, 2, 0), WorkerVitals("1", False, None, 0, 1)]
    pool = PoolMetrics(lambda: [], lambda: worker_families(vitals))
    text = generate_latest(pool.registry).decode()  # type: ignore[arg-type]
    assert 'ptmserve_worker_up{worker="0"} 1.0' in text and 'ptmserve_worker_up{worker="1"} 0.0' in text
    assert 'ptmserve_worker_pid{worker="0"} 101.0' in text and 'ptmserve_worker_pid{worker="1"}' not in text
    assert 'ptmserve_worker_in_flight{worker="0"} 2.0' in text
    assert 'ptmserve_worker_restarts_total{worker="1"} 1.0' in text
