"""HTTP behaviour over the real engine: bad input, limits, auth, overload, disconnects, draining, metrics.

Every test runs the real app under uvicorn over a real ``Engine`` with tiny random models, and checks
answers against what the engine itself computes, and error messages against what the product says.
Requests are held in flight with real work: a request of ``heavy_ids(384)`` for ``tiny-long`` keeps the
engine's worker busy for a second or more, during which later requests wait in its queue.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from ptmserve.engine.api import InferenceOptions
from tests.models.tiny import tiny_vocab_size
from tests.server.conftest import (
    CLS,
    EMB,
    LONG,
    heavy_ids,
    live_server,
    open_engine,
    running_server,
    wait_for,
)

LIMITS = {"max_batch_inputs": 16, "max_body_bytes": 64 * 1024, "max_input_length": 1000}
# µs: a deadline no test request comes near, so that a loaded machine does not turn a 200 into a 504
SLOW = 120_000_000


@pytest.fixture(scope="module")
def limited_url(real_engine: Any) -> Iterator[str]:
    """The real engine behind a server with small request limits (16 inputs, 64 KiB, 1000 characters)."""
    with running_server(real_engine, **LIMITS) as url:
        yield url


@pytest.fixture
def http(limited_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_url, timeout=30) as c:
        yield c


def _text_infer(texts: list[str], **extra: Any) -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}], **extra}


def _ids_infer(ids: list[list[int]], **extra: Any) -> dict:
    shape = [len(ids), len(ids[0])]
    return {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": shape, "data": ids}], **extra}


def _embedding(r: httpx.Response) -> np.ndarray:
    """The embeddings of a 200 answer of either protocol, as a (N, dim) array."""
    assert r.status_code == 200, r.text
    body = r.json()
    if "data" in body:
        return np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    out = next(o for o in body["outputs"] if o["name"] == "EMBEDDING")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _requests(model: str, outcome: str) -> str:
    return f'ptmserve_requests_total{{model="{model}",outcome="{outcome}"}}'


def _http_code(code: int, route: str) -> str:
    return f'ptmserve_http_requests_total{{code="{code}",method="POST",route="{route}"}}'


# ------------------------------------------------------------------------------------ bad input


def _says(message: str, words: str | tuple[str, ...]) -> bool:
    """``message`` holds ``words`` (each of them, when a tuple)."""
    return all(w in message for w in ((words,) if isinstance(words, str) else words))


VOCAB = tiny_vocab_size("bert")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": EMB, "input": []}, 400, "input must be a non-empty list of texts or of token-id lists"),
        ({"model": EMB, "input": ""}, 400, "input[0] is an empty string"),
        ({"model": EMB, "input": ["a", ""]}, 400, "input[1] is an empty string"),
        ({"model": EMB, "input": [[]]}, 400, "input 0 has no tokens"),
        (
            {"model": EMB, "input": [1, 1000]},
            400,
            f"input 0 holds token id 1000; ids must be integers in [0, {VOCAB})",
        ),
        ({"model": EMB, "input": [[5], [1, -1]]}, 400, "input 1 holds token id -1"),
        ({"model": EMB, "input": 5}, 400, "input: must be a string, a list of strings, or token ids"),
        ({"model": EMB, "input": [1, "a"]}, 400, "input: must be a string, a list of strings, or token ids"),
        ({"model": 3, "input": "a"}, 400, "model: Input should be a valid string"),
        ({"input": "a"}, 400, "model: Field required"),
        (
            {"model": EMB, "input": "a", "encoding_format": "hex"},
            400,
            "encoding_format: Input should be 'float' or 'base64'",
        ),
        (
            {"model": EMB, "input": "a", "dimensions": 4},
            400,
            f"dimensions=4 is not supported: model '{EMB}' returns 32",
        ),
        ({"model": EMB, "input": "a", "priority": "high"}, 400, "priority: Input should be a valid integer"),
        (
            {"model": EMB, "input": "a", "timeout": -1},
            400,
            "timeout: Input should be greater than or equal to 0",
        ),
        ({"model": "nope", "input": "a"}, 404, "model 'nope' is not in the repository"),
        ({"model": "../../etc/passwd", "input": "a"}, 400, "invalid model name '../../etc/passwd'"),
        ({"model": EMB, "input": ["a"] * 17}, 413, "17 inputs in one request; the limit is 16"),
        ({"model": EMB, "input": ["y" * 1001]}, 413, "input 0 has 1001 characters; the limit is 1000"),
    ],
)
def test_openai_bad_input_gets_clear_4xx(
    http: httpx.Client, body: dict, status: int, words: str | tuple[str, ...]
) -> None:
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert _says(err["message"], words), err
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == {400: "invalid_input", 404: "model_not_found", 413: "payload_too_large"}[status]
    assert http.get("/v2/health/live").status_code == 200  # still up


def test_openai_malformed_json_is_400(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    r = http.post("/v1/embeddings", content=b'{"model": "tiny-emb", "input": ', headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"].startswith("body is not valid JSON"), err


def test_openai_dimensions_equal_to_width_is_accepted(http: httpx.Client, real_engine: Any) -> None:
    r = http.post("/v1/embeddings", json={"model": EMB, "input": "a new day", "dimensions": 32})
    _close(_embedding(r), real_engine.embed(EMB, ["a new day"]).embeddings)


@pytest.mark.parametrize(
    ("model", "body", "status", "words"),
    [
        (
            EMB,
            {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "input TEXT must have datatype BYTES, got FP32",
        ),
        (
            EMB,
            {"inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 1], "data": [1]}]},
            400,
            "input INPUT_IDS must have datatype INT64, got INT32",
        ),
        (
            EMB,
            {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [2], "data": [1, 2]}]},
            400,
            "INPUT_IDS must have shape [N, L], got [2]",
        ),
        (
            EMB,
            _ids_infer([[5, 9999]]),
            400,
            f"input 0 holds token id 9999; ids must be integers in [0, {VOCAB})",
        ),
        (
            EMB,
            {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            ("unknown input", "PIXELS", "TEXT or INPUT_IDS"),
        ),
        (
            EMB,
            _text_infer(["a"], outputs=[{"name": "LOGITS"}]),
            400,
            f"model '{EMB}' has no output 'LOGITS'; it has ['EMBEDDING']",
        ),
        (
            EMB,
            _text_infer(["a"], parameters={"timeout": -1}),
            400,
            ("parameter 'timeout' must be", "got -1"),
        ),
        (
            EMB,
            _text_infer(["a"], parameters={"priority": "high"}),
            400,
            ("parameter 'priority' must be", "got 'high'"),
        ),
        (EMB, _text_infer([]), 400, "input must be a non-empty list of texts or of token-id lists"),
        (
            EMB,
            {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 2], "data": ["a"] * 4}]},
            400,
            "TEXT must have shape [N] or [N, 1], got [2, 2]",
        ),
        ("nope", _text_infer(["a"]), 404, "model 'nope' is not in the repository"),
        ("a..b/c", _text_infer(["a"]), 404, "no route POST"),
        (EMB, _text_infer(["a"] * 17), 413, "17 inputs in one request; the limit is 16"),
        (EMB, _text_infer(["y" * 1001]), 413, "input 0 has 1001 characters; the limit is 1000"),
    ],
)
def test_kserve_bad_input_gets_clear_4xx(
    http: httpx.Client, model: str, body: dict, status: int, words: str | tuple[str, ...]
) -> None:
    r = http.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and _says(r.json()["error"], words), r.text


def test_attention_mask_drops_padding(http: httpx.Client, real_engine: Any) -> None:
    ids = [[5, 6, 7], [8, 0, 0]]
    mask = {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [2, 3], "data": [[1, 1, 1], [1, 0, 0]]}
    body = _ids_infer(ids)
    body["inputs"].append(mask)
    r = http.post(f"/v2/models/{EMB}/infer", json=body)
    assert r.json()["parameters"]["prompt_tokens"] == 4
    _close(_embedding(r), real_engine.embed(EMB, [[5, 6, 7], [8]]).embeddings)


def test_long_token_inputs_are_truncated_at_max_tokens(http: httpx.Client, real_engine: Any) -> None:
    max_tokens = real_engine.model_info(EMB).max_tokens
    ids = list(range(5, 5 + max_tokens + 7))
    r = http.post("/v1/embeddings", json={"model": EMB, "input": [ids], "encoding_format": "float"})
    assert r.json()["usage"]["prompt_tokens"] == max_tokens
    _close(_embedding(r), real_engine.embed(EMB, [ids[:max_tokens]]).embeddings)


def test_token_id_list_over_the_length_limit_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": EMB, "input": [list(range(1, 90))] * 2 + [[1] * 1001]})
    assert r.status_code == 413
    assert "input 2 has 1001 token ids; the limit is 1000" in r.json()["error"]["message"]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v2/nothing/here")
    assert r.status_code == 404 and r.json() == {"error": "no route GET /v2/nothing/here"}
    r = http.get("/v1/embeddings")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------------- limits


def test_body_over_limit_is_413_and_server_stays_up(http: httpx.Client) -> None:
    r = http.post(f"/v2/models/{EMB}/infer", content=b"x" * (64 * 1024 + 1))
    assert r.status_code == 413
    assert "body of 65537 bytes exceeds the limit of 65536 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"y" * 8192

    r = http.post("/v1/embeddings", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert http.get("/v2/health/ready").status_code == 200


def test_compressed_body_is_limited_after_decompression(http: httpx.Client, real_engine: Any) -> None:
    small = json.dumps(_text_infer(["a new day"])).encode()
    r = http.post(
        f"/v2/models/{EMB}/infer", content=gzip.compress(small), headers={"content-encoding": "gzip"}
    )
    _close(_embedding(r), real_engine.embed(EMB, ["a new day"]).embeddings)
    bomb = json.dumps(_text_infer(["a " * 200_000])).encode()  # 400 KB of JSON, 1 KB compressed
    r = http.post(
        f"/v2/models/{EMB}/infer", content=gzip.compress(bomb), headers={"content-encoding": "gzip"}
    )
    assert r.status_code == 413 and "65536" in r.json()["error"], r.text
    assert http.get("/v2/health/ready").status_code == 200


def test_bug_is_500_without_traceback(
    real_url: str, real_engine: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A correct engine raises only the typed errors of ptmserve.errors, so no real request makes it
    # fail with anything else: the real engine is wrapped to raise a plain exception on one input.
    real_aembed = real_engine.aembed

    async def buggy(model: str, inputs: Any, options: InferenceOptions = InferenceOptions()) -> Any:
        if "boom" in inputs:
            raise RuntimeError("a bug in the engine")
        return await real_aembed(model, inputs, options)

    monkeypatch.setattr(real_engine, "aembed", buggy)
    with caplog.at_level(logging.ERROR):
        r = httpx.post(f"{real_url}/v1/embeddings", json={"model": EMB, "input": "boom"}, timeout=30)
        k = httpx.post(f"{real_url}/v2/models/{EMB}/infer", json=_text_infer(["boom"]), timeout=30)
    assert r.status_code == 500 and k.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error (logged on the server)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert k.json() == {"error": "internal server error (logged on the server)"}
    for resp in (r, k):
        assert "Traceback" not in resp.text and "RuntimeError" not in resp.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 2 and all("a bug in the engine" in str(rec.exc_info[1]) for rec in logged)
    ok = httpx.post(f"{real_url}/v1/embeddings", json={"model": EMB, "input": "a"}, timeout=30)
    assert ok.status_code == 200


# --------------------------------------------------------------------------------------- auth


def test_auth_on(real_engine: Any) -> None:
    with running_server(real_engine, api_key="s3cret") as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v2/health/live").status_code == 200  # health needs no key
        assert c.get("/v2/health/ready").status_code == 200
        for path in ("/v2", f"/v2/models/{EMB}", "/v1/models", "/metrics", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/embeddings", json={"model": EMB, "input": "a"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post(
            f"/v2/models/{EMB}/infer", json=_text_infer(["a"]), headers={"Authorization": "Bearer wrong"}
        )
        assert r.status_code == 401 and r.json() == {"error": "wrong API key"}
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v2", headers=good).status_code == 200
        r = c.post("/v1/embeddings", json={"model": EMB, "input": "a new day"}, headers=good)
        _close(_embedding(r), real_engine.embed(EMB, ["a new day"]).embeddings)


def test_auth_off(http: httpx.Client) -> None:
    assert http.get("/v2").status_code == 200
    assert http.get("/v2", headers={"Authorization": "Bearer anything"}).status_code == 200


# ------------------------------------------------------------------------ overload, disconnect


HEAVY_INPUTS = 384  # 384 x 512 = 196,608 tokens: a second or more of compute in one step


@pytest.fixture(scope="module")
def busy(heavy_repo: Path) -> Iterator[tuple[Any, str]]:
    """A real engine whose queues hold 2 requests per model and class, served over HTTP.

    Its token budget per step holds one heavy request but not two, so the worker computes each heavy
    request in one step (a second or more), during which it runs nothing else.
    """
    engine = open_engine(heavy_repo, max_queue=2, max_batch_tokens=HEAVY_INPUTS * 512 + 1000)
    try:
        with running_server(engine, max_batch_inputs=HEAVY_INPUTS) as url:
            yield engine, url
    finally:
        engine.close(drain_seconds=10)


def _steps(url: str, model: str) -> float:
    """Steps (batches) the engine has finished for ``model``."""
    return _metric(url, f'ptmserve_compute_seconds_count{{model="{model}"}}')


async def _occupy_worker(c: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    """Post two heavy ``tiny-long`` requests; return the second's task once the first is answered.

    The second is queued while the first computes; when the first is answered, the worker is already
    on the second, a step of a second or more during which requests for other models wait.
    """
    tasks = []
    for seed in (1, 2):
        body = {"model": LONG, "input": heavy_ids(HEAVY_INPUTS, seed=seed), "timeout": SLOW}
        tasks.append(asyncio.create_task(c.post("/v1/embeddings", json=body)))
        await asyncio.sleep(0.05)  # so that they queue in this order
    first = await tasks[0]
    assert first.status_code == 200, first.text[:300]
    assert not tasks[1].done(), "the second heavy request ended before the test could use the busy worker"
    return tasks[1]


@pytest.mark.slow
def test_overload_gives_429_rather_than_unbounded_queueing(busy: tuple[Any, str]) -> None:
    engine, url = busy
    n = 6
    rejected = _metric(url, _requests(EMB, "rejected"))

    async def burst() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            heavy = await _occupy_worker(c)
            # While the worker computes, these all arrive: 2 fit the queue, the rest are refused.
            body = _text_infer(["the day"], parameters={"timeout": SLOW})
            queued = [asyncio.create_task(c.post(f"/v2/models/{EMB}/infer", json=body)) for _ in range(n)]
            return await heavy, [await t for t in queued]

    heavy, answers = asyncio.run(burst())
    assert heavy.status_code == 200, heavy.text[:300]
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200] + [429] * (n - 2), [r.text[:200] for r in answers]
    for r in answers:
        if r.status_code == 429:
            assert r.json() == {"error": f"queue for model '{EMB}' (realtime) is full (2)"}
    assert _metric(url, _requests(EMB, "rejected")) == rejected + n - 2
    after = httpx.post(f"{url}/v1/embeddings", json={"model": EMB, "input": "after"}, timeout=60)
    _close(_embedding(after), engine.embed(EMB, ["after"]).embeddings)  # nothing lost or stuck


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    u = urlparse(url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


def _outcomes(url: str, model: str) -> float:
    """Requests for ``model`` that ended, whatever their outcome."""
    start = f'ptmserve_requests_total{{model="{model}",'
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(start))


def _in_flight(url: str) -> float:
    return _metric(url, "ptmserve_http_requests_in_flight ") - 1  # minus the /metrics request itself


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/embeddings", f"/v2/models/{EMB}/infer"])
def test_disconnect_cancels_the_queued_work(busy: tuple[Any, str], path: str) -> None:
    engine, url = busy
    route = "/v1/embeddings" if path.startswith("/v1") else "/v2/models/{model}/infer"
    success, ended = _metric(url, _requests(EMB, "success")), _outcomes(url, EMB)
    steps, closed = _steps(url, EMB), _metric(url, _http_code(499, route))
    body = {"model": EMB, "input": "bye"} if path.startswith("/v1") else _text_infer(["bye"])

    async def leave() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            heavy = await _occupy_worker(c)
            sock = await asyncio.to_thread(_raw_post, url, path, body)
            assert await asyncio.to_thread(wait_for, lambda: _in_flight(url) >= 2), (
                "the request never arrived"  # it and the heavy one
            )
            await asyncio.sleep(0.3)  # it reaches the engine's queue (tokenizing "bye" takes microseconds)
            sock.close()
            assert await asyncio.to_thread(
                wait_for, lambda: _metric(url, _http_code(499, route)) == closed + 1
            ), "the server did not notice the disconnect"
            return await heavy

    assert asyncio.run(leave()).status_code == 200
    # The engine counts the abandoned request once, under an outcome other than success.
    assert wait_for(lambda: _outcomes(url, EMB) == ended + 1), "the engine never ended the request"
    assert _metric(url, _requests(EMB, "success")) == success  # the abandoned request was never computed
    assert _steps(url, EMB) == steps
    after = httpx.post(f"{url}{path}", json=body, timeout=60)
    _close(_embedding(after), engine.embed(EMB, ["bye"]).embeddings)


# ---------------------------------------------------------------------------- draining, metrics


def test_draining_server_is_not_ready(real_engine: Any) -> None:
    with live_server(real_engine) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v1/embeddings", json={"model": EMB, "input": "a"}).status_code == 200
        live.plane.draining = True  # what SIGTERM does first
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post("/v1/embeddings", json={"model": EMB, "input": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.json()["error"]["message"] == "the server is shutting down"
        r = c.post(f"/v2/models/{EMB}/infer", json=_text_infer(["a"]))
        assert r.status_code == 503 and r.json() == {"error": "the server is shutting down"}


def test_metrics_count_each_outcome(real_url: str) -> None:
    """Engine outcomes (success, timeout) and HTTP codes move by exactly the requests sent."""
    infer = "/v2/models/{model}/infer"
    keys = [
        _requests(EMB, "success"),
        _requests(EMB, "timeout"),
        _http_code(200, "/v1/embeddings"),
        _http_code(404, "/v1/embeddings"),
        _http_code(504, infer),
        _http_code(400, infer),
    ]
    before = {k: _metric(real_url, k) for k in keys}
    with httpx.Client(base_url=real_url, timeout=30) as c:
        assert c.post("/v1/embeddings", json={"model": EMB, "input": ["a", "b"]}).status_code == 200
        assert c.post("/v1/embeddings", json={"model": "nope", "input": "a"}).status_code == 404
        r = c.post(f"/v2/models/{EMB}/infer", json=_text_infer(["a"], parameters={"timeout": 1}))
        assert r.status_code == 504 and "deadline" in r.json()["error"], r.text
        assert c.post(f"/v2/models/{EMB}/infer", json=_text_infer([])).status_code == 400
    after = {k: _metric(real_url, k) for k in keys}
    assert {k: after[k] - before[k] for k in keys} == dict.fromkeys(keys, 1.0)


# ------------------------------------------------------------------------------ model control


def test_explicit_model_control_through_the_repository_api(tiny_repo: Path) -> None:
    engine = open_engine(tiny_repo, model_control="explicit")
    try:
        with running_server(engine) as url, httpx.Client(base_url=url, timeout=30) as c:
            index = c.post("/v2/repository/index").json()
            assert {m["name"]: m["state"] for m in index} == {EMB: "UNAVAILABLE", CLS: "UNAVAILABLE"}
            assert c.post("/v2/repository/index", json={"ready": True}).json() == []
            assert c.get(f"/v2/models/{EMB}/ready").status_code == 503
            r = c.post("/v1/embeddings", json={"model": EMB, "input": "a"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
            assert f"model '{EMB}' is not ready" in r.json()["error"]["message"]
            assert c.get("/v1/models").json()["data"] == []
            assert c.post(f"/v2/repository/models/{EMB}/load").status_code == 200
            assert c.get(f"/v2/models/{EMB}/ready").status_code == 200
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [EMB]
            assert [m["name"] for m in c.post("/v2/repository/index", json={"ready": True}).json()] == [EMB]
            r = c.post("/v1/embeddings", json={"model": EMB, "input": "a new day"})
            _close(_embedding(r), engine.embed(EMB, ["a new day"]).embeddings)
            assert c.post(f"/v2/repository/models/{EMB}/unload").status_code == 200
            assert c.get(f"/v2/models/{EMB}/ready").status_code == 503
            r = c.post("/v2/repository/models/nope/load")
            assert r.status_code == 404 and r.json() == {"error": "model 'nope' is not in the repository"}
            r = c.post(f"/v2/repository/models/{EMB}/load", json={"parameters": {"config": "{}"}})
            assert r.status_code == 400, r.text
    finally:
        engine.close(drain_seconds=5)


def test_options_carry_priority_and_timeout(
    real_url: str, real_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[InferenceOptions] = []
    real_aembed = real_engine.aembed

    async def spy(model: str, inputs: Any, options: InferenceOptions = InferenceOptions()) -> Any:
        seen.append(options)
        return await real_aembed(model, inputs, options)

    monkeypatch.setattr(real_engine, "aembed", spy)
    with httpx.Client(base_url=real_url, timeout=30) as c:
        r = c.post(
            f"/v2/models/{EMB}/infer",
            json=_text_infer(["a"], parameters={"priority": 2, "timeout": 5_000_000}),
        )
        _close(_embedding(r), real_engine.embed(EMB, ["a"]).embeddings)
        r = c.post("/v1/embeddings", json={"model": EMB, "input": "a", "priority": 1, "timeout": 7_000_000})
        _close(_embedding(r), real_engine.embed(EMB, ["a"]).embeddings)
        late = c.post(f"/v2/models/{EMB}/infer", json=_text_infer(["a"], parameters={"timeout": 1}))
    assert [(o.priority, o.timeout_us) for o in seen] == [(2, 5_000_000), (1, 7_000_000), (0, 1)]
    assert late.status_code == 504 and "deadline already passed" in late.json()["error"], late.text
