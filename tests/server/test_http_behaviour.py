"""HTTP behaviour that needs control over the engine: limits, auth, overload, disconnects, bugs.

Runs the real app under uvicorn over ``FakeEngine`` (deterministic results, a ``hold`` switch that keeps
requests in flight). The same routes over the real engine are covered by ``test_protocols_real.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from ptmserve.engine.api import InferenceOptions
from tests.server.conftest import live_server, running_server, wait_for
from tests.server.fake_engine import FakeEngine, fake_vector


@pytest.fixture
def http(fake_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_url, timeout=10) as c:
        yield c


def _text_infer(texts: list[str]) -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "emb", "input": []}, 400, "non-empty list"),
        ({"model": "emb", "input": ""}, 400, "empty string"),
        ({"model": "emb", "input": ["a", ""]}, 400, "input[1] is an empty string"),
        ({"model": "emb", "input": [[]]}, 400, "non-empty list of token ids"),
        ({"model": "emb", "input": [1, 100]}, 400, "not a token id in [0, 100)"),
        ({"model": "emb", "input": 5}, 400, "input: must be"),
        ({"model": "emb", "input": [1, "a"]}, 400, "input: must be"),
        ({"model": 3, "input": "a"}, 400, "model"),
        ({"input": "a"}, 400, "model"),
        ({"model": "emb", "input": "a", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": "emb", "input": "a", "dimensions": 4}, 400, "dimensions=4"),
        ({"model": "nope", "input": "a"}, 404, "nope"),
        ({"model": "../../etc/passwd", "input": "a"}, 400, "invalid model name"),
        ({"model": "emb", "input": ["a"] * 17}, 413, "limit is 16"),
    ],
)
def test_openai_bad_input_gets_clear_4xx(http: httpx.Client, body: dict, status: int, words: str) -> None:
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert http.get("/v2/health/live").status_code == 200  # still up


def test_openai_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/v1/embeddings", content=b'{"model": "emb", "input": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_dimensions_equal_to_width_is_accepted(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "emb", "input": "a", "dimensions": 8})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], fake_vector("a"), rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "body", "status", "words"),
    [
        (
            "emb",
            {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "BYTES",
        ),
        (
            "emb",
            {"inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 1], "data": [1]}]},
            400,
            "INT64",
        ),
        (
            "emb",
            {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [2], "data": [1, 2]}]},
            400,
            "[N, L]",
        ),
        (
            "emb",
            {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "unknown",
        ),
        ("emb", {**_text_infer(["a"]), "outputs": [{"name": "LOGITS"}]}, 400, "no output 'LOGITS'"),
        ("emb", {**_text_infer(["a"]), "parameters": {"timeout": -1}}, 400, "timeout"),
        ("emb", {**_text_infer(["a"]), "parameters": {"priority": "high"}}, 400, "priority"),
        ("emb", _text_infer([]), 400, "non-empty list"),
        (
            "emb",
            _text_infer(["x" * 10])
            | {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 2], "data": ["a"] * 4}]},
            400,
            "[N, 1]",
        ),
        ("nope", _text_infer(["a"]), 404, "nope"),
        ("emb", _text_infer(["a"] * 17), 413, "limit"),
        (
            "emb",
            _text_infer(["a"])
            | {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["y" * 1001]}]},
            413,
            "1001 characters",
        ),
    ],
)
def test_kserve_bad_input_gets_clear_4xx(
    http: httpx.Client, model: str, body: dict, status: int, words: str
) -> None:
    r = http.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_attention_mask_drops_padding(http: httpx.Client) -> None:
    ids = [[5, 6, 7], [8, 0, 0]]
    body = {
        "inputs": [
            {"name": "INPUT_IDS", "datatype": "INT64", "shape": [2, 3], "data": ids},
            {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [2, 3], "data": [[1, 1, 1], [1, 0, 0]]},
        ]
    }
    out = http.post("/v2/models/emb/infer", json=body).json()["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, np.stack([fake_vector([5, 6, 7]), fake_vector([8])]), rtol=1e-6)


def test_long_token_inputs_are_truncated_at_max_tokens(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "emb", "input": [list(range(1, 40))]})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 16  # the fake model's max_tokens
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], fake_vector(list(range(1, 17))), rtol=1e-6)


def test_token_id_list_over_the_length_limit_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "emb", "input": [list(range(1, 90))] * 2 + [[1] * 1001]})
    assert r.status_code == 413 and "input 2 has 1001 token ids" in r.json()["error"]["message"]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v2/nothing/here")
    assert r.status_code == 404 and "no route" in r.json()["error"]
    r = http.get("/v1/embeddings")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------------- limits


def test_body_over_limit_is_413_and_server_stays_up(http: httpx.Client) -> None:
    big = b"x" * (64 * 1024 + 1)
    r = http.post("/v2/models/emb/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"y" * 8192

    r = http.post("/v1/embeddings", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert http.get("/v2/health/ready").status_code == 200


def test_bug_is_500_without_traceback(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR"):
        r = http.post("/v1/embeddings", json={"model": "emb", "input": "boom"})
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "internal server error (logged on the server)"
    assert "Traceback" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and "a bug in the engine" in str(logged[0].exc_info[1])
    assert http.get("/v2/health/live").status_code == 200


# --------------------------------------------------------------------------------------- auth


def test_auth_on() -> None:
    with running_server(FakeEngine(), api_key="s3cret") as url, httpx.Client(base_url=url) as c:
        assert c.get("/v2/health/live").status_code == 200  # health needs no key
        assert c.get("/v2/health/ready").status_code == 200
        for path in ("/v2", "/v2/models/emb", "/v1/models", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/embeddings", json={"model": "emb", "input": "a"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.get("/v2", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"error": "wrong API key"}
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v2", headers=good).status_code == 200
        r = c.post("/v1/embeddings", json={"model": "emb", "input": "a"}, headers=good)
        assert r.status_code == 200


def test_auth_off(http: httpx.Client) -> None:
    assert http.get("/v2").status_code == 200
    assert http.get("/v2", headers={"Authorization": "Bearer anything"}).status_code == 200


# ------------------------------------------------------------------------ overload, disconnect


def test_overload_gives_429_not_unbounded_queueing() -> None:
    engine = FakeEngine(max_in_flight=2)
    engine.hold = True
    with running_server(engine) as url:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=20) as c:
                first = [
                    asyncio.create_task(c.post("/v1/embeddings", json={"model": "emb", "input": f"x{i}"}))
                    for i in range(2)
                ]
                await asyncio.to_thread(wait_for, lambda: engine.in_flight == 2)
                more = [await c.post("/v1/embeddings", json={"model": "emb", "input": "y"}) for _ in range(3)]
                engine.hold = False
                return [r.status_code for r in more] + [(await t).status_code for t in first]

        codes = asyncio.run(burst())
    assert codes == [429, 429, 429, 200, 200]


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    u = urlparse(url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v2/models/emb/infer"])
def test_disconnect_cancels_the_queued_work(path: str) -> None:
    engine = FakeEngine()
    engine.hold = True
    body = {"model": "emb", "input": "bye"} if path.startswith("/v1") else _text_infer(["bye"])
    with running_server(engine) as url:
        sock = _raw_post(url, path, body)
        assert wait_for(lambda: engine.in_flight == 1)
        sock.close()
        assert wait_for(lambda: engine.cancelled == 1), "the server did not cancel the abandoned request"
        assert engine.in_flight == 0 and engine.completed == 0
        engine.hold = False
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "emb", "input": "still here"})
        assert r.status_code == 200 and engine.completed == 1


def test_draining_server_is_not_ready(fake_engine: FakeEngine) -> None:
    with live_server(fake_engine) as live, httpx.Client(base_url=live.url) as c:
        live.plane.draining = True  # what SIGTERM does first
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post("/v1/embeddings", json={"model": "emb", "input": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_metrics_move_as_requests_are_served(http: httpx.Client) -> None:
    def value(text: str, line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    key = 'ptmserve_requests_total{model="emb",outcome="success"}'
    http_key = 'ptmserve_http_requests_total{code="200",method="POST",route="/v1/embeddings"}'
    before = http.get("/metrics").text
    assert http.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]}).status_code == 200
    after = http.get("/metrics").text
    assert value(after, key) == value(before, key) + 1
    assert value(after, http_key) == value(before, http_key) + 1


def test_explicit_model_control_through_the_repository_api() -> None:
    engine = FakeEngine(model_control="explicit")
    with running_server(engine) as url, httpx.Client(base_url=url) as c:
        index = c.post("/v2/repository/index").json()
        assert {m["name"]: m["state"] for m in index} == {"emb": "UNAVAILABLE", "cls": "UNAVAILABLE"}
        assert c.get("/v2/models/emb/ready").status_code == 503
        assert c.post("/v1/embeddings", json={"model": "emb", "input": "a"}).status_code == 503
        assert c.get("/v1/models").json()["data"] == []
        assert c.post("/v2/repository/models/emb/load").status_code == 200
        assert c.get("/v2/models/emb/ready").status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["emb"]
        assert c.post("/v2/repository/index", json={"ready": True}).json()[0]["name"] == "emb"
        assert c.post("/v1/embeddings", json={"model": "emb", "input": "a"}).status_code == 200
        assert c.post("/v2/repository/models/emb/unload").status_code == 200
        assert c.get("/v2/models/emb/ready").status_code == 503
        assert c.post("/v2/repository/models/nope/load").status_code == 404
        r = c.post("/v2/repository/models/emb/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400


def test_options_carry_priority_and_timeout() -> None:
    seen: list[InferenceOptions] = []
    engine = FakeEngine()
    original = engine.aembed

    async def spy(model, inputs, options=InferenceOptions()):
        seen.append(options)
        return await original(model, inputs, options)

    engine.aembed = spy  # type: ignore[method-assign]
    with running_server(engine) as url:
        body = _text_infer(["a"]) | {"parameters": {"priority": 2, "timeout": 5_000_000}}
        assert httpx.post(f"{url}/v2/models/emb/infer", json=body).status_code == 200
        body = _text_infer(["a"]) | {"parameters": {"timeout": 1}}
        r = httpx.post(f"{url}/v2/models/emb/infer", json=body)
    assert (seen[0].priority, seen[0].timeout_us) == (2, 5_000_000)
    assert r.status_code == 504 and "deadline" in r.json()["error"]
