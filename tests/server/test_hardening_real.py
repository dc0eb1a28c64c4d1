"""Hostile and careless clients against the real server over the real engine (tiny random models).

Each case: the bad request gets the documented status and error body, quickly, and the server keeps
serving (a good request succeeds afterwards). Covers malformed values (lone surrogates, impossible
shapes, huge schedule parameters), requests whose declared shape is far beyond the limits, slow clients
(header and body timeouts, the connection cap) and requests cut off by the end of the drain period.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from ptmserve.server.serve import build_server
from ptmserve.server.settings import ServerSettings
from tests.server.conftest import EMB, LONG, free_socket, heavy_ids, live_server, open_engine, wait_for

INFER = f"/v2/models/{EMB}/infer"
GOOD_KSERVE = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
GOOD_OPENAI = {"model": EMB, "input": "hello"}


def _still_serving(url: str) -> None:
    r = httpx.post(url + INFER, json=GOOD_KSERVE, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/embeddings", json=GOOD_OPENAI, timeout=30)
    assert r.status_code == 200, r.text


def _kserve_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert isinstance(message, str)
    for w in words:
        assert w in message, message


def _openai_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]


# ------------------------------------------------------------------------------ malformed values


def test_lone_surrogate_in_openai_input_is_400(real_url: str) -> None:
    for raw in (
        b'{"model": "tiny-emb", "input": "a\\ud800b"}',
        b'{"model": "tiny-emb", "input": ["fine", "x\\udfff"]}',
    ):
        r = httpx.post(real_url + "/v1/embeddings", content=raw, timeout=30)
        _openai_error(r, 400, "surrogate")
        assert r.json()["error"]["code"] == "invalid_input"
    # The same text through KServe, as JSON, is refused as before.
    raw = b'{"inputs":[{"name":"TEXT","datatype":"BYTES","shape":[1],"data":["a\\ud800b"]}]}'
    _kserve_error(httpx.post(real_url + INFER, content=raw, timeout=30), 400, "UTF-8")
    _still_serving(real_url)


def _empty(name: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES" if name == "TEXT" else "INT64", "shape": shape, "data": []}


@pytest.mark.parametrize(
    ("tensor", "status", "words"),
    [
        (_empty("TEXT", [0, 9223372036854775808]), 400, "too large"),
        (_empty("INPUT_IDS", [1099511627776, 0]), 400, "too large"),
        (_empty("INPUT_IDS", [0, 2**70]), 400, "too large"),
        (_empty("TEXT", [0, 0, 0, 0, 0, 0, 0, 2**40]), 400, "too large"),
        # Representable, but beyond the server's limits: 413 naming the limit.
        (_empty("INPUT_IDS", [300000, 0]), 413, "the limit is 256"),
        (_empty("INPUT_IDS", [0, 200000]), 413, "--max-input-length"),
        (_empty("ATTENTION_MASK", [1, 200000]), 413, "200000"),
    ],
)
def test_empty_tensors_with_huge_dimensions(real_url: str, tensor: dict, status: int, words: str) -> None:
    r = httpx.post(real_url + INFER, json={"inputs": [tensor]}, timeout=30)
    _kserve_error(r, status, words)
    _still_serving(real_url)


HUGE = "1" + "0" * 400  # a JSON integer no float can hold


@pytest.mark.parametrize(("key", "value"), [("timeout", HUGE), ("timeout", "1e400"), ("priority", HUGE)])
def test_huge_schedule_parameters_are_400_on_both_routes(real_url: str, key: str, value: str) -> None:
    text = '{"name":"TEXT","datatype":"BYTES","shape":[1],"data":["a"]}'
    raw = f'{{"parameters":{{"{key}":{value}}},"inputs":[{text}]}}'.encode()
    _kserve_error(httpx.post(real_url + INFER, content=raw, timeout=30), 400, key)
    raw = f'{{"model":"{EMB}","input":"a","{key}":{value}}}'.encode()
    r = httpx.post(real_url + "/v1/embeddings", content=raw, timeout=30)
    _openai_error(r, 400, key)
    assert r.json()["error"]["param"] == key
    _still_serving(real_url)


def test_largest_schedule_values_are_accepted(real_url: str) -> None:
    """uint64 is the range, as in Triton: its largest timeout is a deadline that never comes."""
    big = 2**64 - 1
    body = {**GOOD_KSERVE, "parameters": {"timeout": big, "priority": 2}}
    assert httpx.post(real_url + INFER, json=body, timeout=30).status_code == 200
    body = {**GOOD_OPENAI, "timeout": big}
    assert httpx.post(real_url + "/v1/embeddings", json=body, timeout=30).status_code == 200
    r = httpx.post(real_url + INFER, json={**GOOD_KSERVE, "parameters": {"timeout": big + 1}}, timeout=30)
    _kserve_error(r, 400, "timeout", str(big))


# ------------------------------------------------------------- big shapes refused before any work


class HealthProbe:
    """Polls ``/v2/health/live`` on its own connection and keeps the slowest answer's latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                ok = c.get("/v2/health/live").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - t0 if ok else float("inf"))
                self.answers += 1
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        assert wait_for(lambda: self.answers > 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _timed_post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    return r, time.perf_counter() - t0


def test_empty_rows_beyond_the_batch_limit_are_refused_before_allocating(real_url: str) -> None:
    """92 bytes used to stall the server for seconds while it built ten million empty lists."""
    body = b'{"inputs":[{"name":"INPUT_IDS","datatype":"INT64","shape":[10000000,0],"data":[]}]}'
    with HealthProbe(real_url) as probe:
        r, seconds = _timed_post(real_url + INFER, body)
    _kserve_error(r, 413, "10000000 inputs in one request; the limit is 256")
    assert seconds < 1.0, seconds
    assert probe.worst < 1.0, probe.worst
    # The binary form is refused the same way, before its (absent) data is looked at.
    tensor = {**_empty("INPUT_IDS", [10000000, 0]), "parameters": {"binary_data_size": 0}}
    del tensor["data"]
    head = json.dumps({"inputs": [tensor]}).encode()
    r = httpx.post(
        real_url + INFER, content=head, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    _kserve_error(r, 413, "10000000 inputs")
    _still_serving(real_url)


def test_sixteen_mib_of_empty_strings_is_refused_fast(real_url: str) -> None:
    """4 million empty strings (just under the 16 MiB body limit) on both routes: 413 without a stall."""
    n = 4_000_000
    kserve = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [n], "data": [""] * n}]})
    openai = json.dumps({"model": EMB, "input": [""] * n})
    # A shape that lies about the data: the data is not read past the declared element count.
    liar = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [""] * n}]})
    cases = [(INFER, kserve, 413, "4000000 inputs"), ("/v1/embeddings", openai, 413, "4000000 inputs"),
             (INFER, liar, 400, "more data elements")]  # fmt: skip
    for path, body, status, words in cases:
        assert len(body) < 16 * 1024 * 1024
        with HealthProbe(real_url) as probe:
            r, seconds = _timed_post(real_url + path, body.encode())
        assert r.status_code == status, r.text
        assert words in r.text
        assert seconds < 2.0, (path, seconds)
        assert probe.worst < 1.0, (path, probe.worst)
    _still_serving(real_url)


# ------------------------------------------------------------------------------------ slow clients


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    return sock


def _read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; and how long that took."""
    sock.settimeout(seconds)
    t0 = time.perf_counter()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.perf_counter() - t0


@pytest.fixture(scope="module")
def impatient_url(real_engine: Any) -> Iterator[str]:
    """The real engine behind a server that gives clients 1 s for headers and 1 s for a body."""
    with live_server(real_engine, header_timeout=1.0, body_timeout=1.0) as live:
        yield live.url


def test_stalled_bodies_get_408_within_the_body_timeout(impatient_url: str) -> None:
    request = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode() + b'{"inputs": ['
    socks = [_connect(impatient_url) for _ in range(20)]
    for s in socks:
        s.sendall(request)
    sent = time.perf_counter()
    try:
        _still_serving(impatient_url)  # while they stall, others are served
        for s in socks:
            data, _ = _read_until_closed(s, 10)
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
            body = json.loads(data.split(b"\r\n\r\n", 1)[1])
            assert "--body-timeout" in body["error"]
        assert time.perf_counter() - sent < 4.0  # 1 s of body timeout, and some slack
    finally:
        for s in socks:
            s.close()
    _still_serving(impatient_url)


def test_trickled_and_missing_headers_are_cut_off_at_the_header_timeout(impatient_url: str) -> None:
    trickle = [_connect(impatient_url) for _ in range(10)]
    silent = [_connect(impatient_url) for _ in range(10)]
    try:
        t0 = time.perf_counter()
        for s in trickle:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        for _ in range(3):  # a header line every 0.4 s would keep a per-read timeout alive forever
            time.sleep(0.4)
            for s in trickle:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")
        for s in trickle + silent:
            data, _ = _read_until_closed(s, 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert time.perf_counter() - t0 < 4.0
    finally:
        for s in trickle + silent:
            s.close()
    _still_serving(impatient_url)


def test_keep_alive_connections_still_serve_several_requests(impatient_url: str) -> None:
    """The header timer restarts with each request: a client that pauses between requests is fine."""
    with httpx.Client(base_url=impatient_url, timeout=30) as c:
        for _ in range(3):
            assert c.post(INFER, json=GOOD_KSERVE).status_code == 200
            time.sleep(0.3)


def test_connections_beyond_the_cap_get_503_in_the_error_format(real_engine: Any) -> None:
    with live_server(real_engine, max_connections=3) as live:
        idle = [_connect(live.url) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server accept them
            r = httpx.post(live.url + INFER, json=GOOD_KSERVE, timeout=30)
            _kserve_error(r, 503, "--max-connections")
            r = httpx.post(live.url + "/v1/embeddings", json=GOOD_OPENAI, timeout=30)
            _openai_error(r, 503, "--max-connections")
        finally:
            for s in idle:
                s.close()
        assert wait_for(lambda: httpx.get(live.url + "/v2/health/live").status_code == 200)
        _still_serving(live.url)


# ------------------------------------------------------------------------------------------ drain


@contextlib.contextmanager
def _server_in_thread(engine: Any, **settings: Any) -> Iterator[tuple[Any, str]]:
    sock = free_socket()
    port = sock.getsockname()[1]
    server = build_server(
        engine, ServerSettings(port=port, log_level="warning", **settings), owns_engine=False
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def test_requests_cut_off_by_the_drain_get_json_503(heavy_repo: Any) -> None:
    """When the drain period ends, what is still running is answered 503 with the error body, not a
    plain-text 500 (uvicorn cancels those requests; the guard answers them)."""
    engine = open_engine(heavy_repo)
    try:
        with _server_in_thread(engine, drain_seconds=1.0) as (server, url):
            ids = heavy_ids(64)
            body = {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [64, 512], "data": ids}]}
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(httpx.post, f"{url}/v2/models/{LONG}/infer", json=body, timeout=60)
                           for _ in range(8)]  # fmt: skip
                assert wait_for(lambda: _in_flight(url) >= 8)
                server.should_exit = True
                answers = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in answers)
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses, statuses
        for r in answers:
            if r.status_code == 503:
                _kserve_error(r, 503, "shutting down")
    finally:
        engine.close(drain_seconds=30)


def _in_flight(url: str) -> float:
    """Requests the server is serving now, from its own gauge (this request included)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ptmserve_http_requests_in_flight "):
            return float(line.rsplit(" ", 1)[1]) - 1
    return 0.0
