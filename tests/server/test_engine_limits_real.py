"""Overload, disconnects and metrics through the real server and the real engine.

To hold requests in the engine deterministically, a test parks the engine's worker thread on a gate
(a control message, as ``Engine.load`` sends): admitted requests then wait in its queue until the gate
opens. What the tests observe is public: the HTTP in-flight gauge and the engine's outcome counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.server.conftest import EMB, open_engine, running_server, wait_for


@contextlib.contextmanager
def parked_worker(engine: Any) -> Iterator[threading.Event]:
    """Keep the engine's worker busy until the block exits (or the yielded event is set)."""
    gate = threading.Event()
    done = engine._worker.control(lambda: gate.wait(30))
    try:
        yield gate
    finally:
        gate.set()
        done.result(timeout=30)


def _in_flight(url: str) -> float:
    """Requests the server is serving now (minus the /metrics request that asks)."""
    return _metric(url, "ptmserve_http_requests_in_flight ") - 1


def _metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _success(model: str) -> str:
    return f'ptmserve_requests_total{{model="{model}",outcome="success"}}'


def _rejected(model: str) -> str:
    return f'ptmserve_requests_total{{model="{model}",outcome="rejected"}}'


@pytest.fixture(scope="module")
def small_queue(tiny_repo: Any) -> Iterator[tuple[Any, str]]:
    """An engine whose queues hold 2 requests per model and class, served over HTTP."""
    engine = open_engine(tiny_repo, max_queue=2)
    try:
        with running_server(engine) as url:
            yield engine, url
    finally:
        engine.close(drain_seconds=5)


def test_overload_gives_429_rather_than_unbounded_queueing(small_queue: tuple[Any, str]) -> None:
    engine, url = small_queue
    n = 6
    rejected = _metric(url, _rejected(EMB))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            with parked_worker(engine):
                tasks = [
                    asyncio.create_task(
                        c.post("/v1/embeddings", json={"model": EMB, "input": f"the day {i}"})
                    )
                    for i in range(n)
                ]
                # Two wait in the queue (its capacity); the others were refused at once.
                assert await asyncio.to_thread(
                    wait_for,
                    lambda: _in_flight(url) >= 2 and _metric(url, _rejected(EMB)) == rejected + n - 2,
                )
            return sorted([(await t).status_code for t in tasks])

    codes = asyncio.run(burst())
    assert codes == [200, 200] + [429] * (n - 2)
    body = httpx.post(f"{url}/v1/embeddings", json={"model": EMB, "input": "after"}, timeout=30)
    assert body.status_code == 200, body.text  # the queue drains; nothing was lost or stuck


def test_disconnect_cancels_the_engine_work(small_queue: tuple[Any, str]) -> None:
    engine, url = small_queue
    cancelled = f'ptmserve_requests_total{{model="{EMB}",outcome="cancelled"}}'
    closed = 'ptmserve_http_requests_total{code="499",method="POST",route="/v1/embeddings"}'
    before_cancelled, before_success = _metric(url, cancelled), _metric(url, _success(EMB))
    u = urlparse(url)
    payload = json.dumps({"model": EMB, "input": "a client that leaves"}).encode()
    with parked_worker(engine):
        sock = socket.create_connection((u.hostname, u.port))
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert wait_for(lambda: _in_flight(url) >= 1)
        time.sleep(0.3)  # it reaches the engine's queue (tokenizing a few words takes microseconds)
        sock.close()
        assert wait_for(lambda: _metric(url, closed) >= 1), "the server did not notice the disconnect"
    assert wait_for(lambda: _metric(url, cancelled) == before_cancelled + 1)
    assert _metric(url, _success(EMB)) == before_success  # the abandoned request was never computed


def test_metrics_move_as_requests_are_served(real_url: str, real_engine: Any) -> None:
    text = httpx.get(f"{real_url}/metrics").text
    for name in ("ptmserve_model_loads_total", "ptmserve_model_evictions_total", "ptmserve_requests_total"):
        assert f"# TYPE {name} counter" in text or f"# TYPE {name.removesuffix('_total')} counter" in text, (
            name
        )
    assert "ptmserve_resident_bytes" in text and "ptmserve_http_requests_total" in text
    before = _metric(real_url, _success(EMB))
    for _ in range(3):
        assert httpx.post(f"{real_url}/v1/embeddings", json={"model": EMB, "input": "a"}).status_code == 200
    assert _metric(real_url, _success(EMB)) == before + 3
    assert _metric(real_url, f'ptmserve_model_loads_total{{model="{EMB}"}}') >= 1
