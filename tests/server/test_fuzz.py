"""Fuzzing the real server (schemathesis over its own /openapi.json, positive and negative cases).

The server runs the real engine on the tiny models, in this module's own engine (the fuzzer loads and
unloads models, which must not disturb other tests). Path and body model names are steered to the real
models in about half of the cases, so the fuzzer reaches inference, not only 404s. Any 500 fails.

``PTMSERVE_FUZZ_EXAMPLES`` sets the examples per operation (default 300, what CI runs); a longer run:

    PTMSERVE_FUZZ_EXAMPLES=5000 pytest tests/server/test_fuzz.py
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmserve.server.app import create_app
from ptmserve.server.settings import ServerSettings
from tests.server.conftest import CLS, EMB, open_engine, running_server

EXAMPLES = int(os.environ.get("PTMSERVE_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def fuzz_engine(tiny_repo: Path) -> Iterator[Any]:
    engine = open_engine(tiny_repo)
    yield engine
    engine.close(drain_seconds=5)


@pytest.fixture(scope="module")
def fuzz_url(fuzz_engine: Any) -> Iterator[str]:
    with running_server(fuzz_engine) as url:
        yield url


# The OpenAPI document depends on the routes only, not on the engine (which the app never calls while
# building it), so it can be made at import time, when pytest collects one test per operation.
# ``test_the_fuzzed_document_is_the_served_one`` checks it is what the real server serves.
DOCUMENT = create_app(None, ServerSettings()).openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(DOCUMENT)


def _steer(case: Any) -> None:
    """Point about half of the cases at real models and the real version."""
    params = case.path_parameters or {}
    key = zlib.crc32((repr(sorted(params.items())) + repr(case.body)[:200]).encode())
    if "model" in params and key % 2 == 0:
        params["model"] = EMB if key % 4 == 0 else CLS
    if "version" in params and key % 3 == 0:
        params["version"] = "1"
    if isinstance(case.body, dict) and "model" in case.body and key % 2 == 0:
        case.body["model"] = EMB


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_server_errors(case: Any, fuzz_url: str) -> None:
    _steer(case)
    response = case.call(base_url=fuzz_url, timeout=30)
    # 503 (not ready) and 504 (deadline exceeded, e.g. a generated "timeout": 1) are answers of the
    # error table; a 500 is a bug.
    assert response.status_code < 500 or response.status_code in (503, 504), (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert "error" in response.json()


def test_the_fuzzed_document_is_the_served_one(fuzz_url: str) -> None:
    assert httpx.get(f"{fuzz_url}/openapi.json", timeout=30).json() == DOCUMENT


# Requests that once crashed servers like this one: lengths that lie, broken encodings, huge numbers.
HOSTILE: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", f"/v2/models/{EMB}/infer", {"Inference-Header-Content-Length": "999999"}, b'{"inputs": []}'),
    ("POST", f"/v2/models/{EMB}/infer", {"Inference-Header-Content-Length": "-5"}, b'{"inputs": []}'),
    ("POST", f"/v2/models/{EMB}/infer", {"Inference-Header-Content-Length": "abc"}, b"{}"),
    (
        "POST",
        f"/v2/models/{EMB}/infer",
        {"Inference-Header-Content-Length": "105"},
        b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], '
        b'"parameters": {"binary_data_size": 4096}}]}   \x05\x00\x00\x00ab',
    ),
    ("POST", f"/v2/models/{EMB}/infer", {"Content-Type": "application/json"}, b'{"inputs": "\xff\xfe"}'),
    ("POST", f"/v2/models/{EMB}/infer", {"Content-Type": "application/json"}, b"[" * 100_000),
    ("POST", f"/v2/models/{EMB}/infer", {"Content-Encoding": "gzip"}, b"\x1f\x8bnot gzip at all"),
    ("POST", f"/v2/models/{EMB}/infer", {"Content-Encoding": "br"}, gzip.compress(b"{}")),
    (
        "POST",
        f"/v2/models/{EMB}/infer",
        {},
        b'{"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [1, 1], "data": [1e400]}]}',
    ),
    (
        "POST",
        f"/v2/models/{EMB}/infer",
        {},
        b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
        b'"parameters": {"priority": 1000000000000000000000000000000, "timeout": NaN}}',
    ),
    ("POST", "/v1/embeddings", {}, b'{"model": "tiny-emb", "input": [[1180591620717411303424]]}'),
    ("POST", "/v1/embeddings", {}, b'{"model": "tiny-emb", "input": "a", "timeout": Infinity}'),
    ("POST", "/v1/embeddings", {}, b'{"model": "' + b"m" * 10_000 + b'", "input": "a"}'),
    ("POST", "/v2/models/%00/infer", {}, b"{}"),
    ("GET", "/v2/models/" + "x" * 5000 + "/config", {}, b""),
    ("POST", f"/v2/repository/models/{EMB}/load", {"Content-Type": "application/json"}, b"null"),
]


def test_server_still_up_after_fuzzing(fuzz_url: str, fuzz_engine: Any) -> None:
    """Hostile requests each get a 4xx with an error body; then the server still computes right answers.

    Run alone, this checks its own hostile requests; after ``test_no_server_errors`` (same server), also
    everything the fuzzer sent.
    """
    with httpx.Client(base_url=fuzz_url, timeout=30) as c:
        for method, path, headers, body in HOSTILE:
            r = c.request(method, path, headers=headers, content=body)
            assert 400 <= r.status_code < 500, (
                f"{method} {path[:60]} {headers} -> {r.status_code}: {r.text[:300]}"
            )
            assert "error" in r.json(), r.text
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        for model in (EMB, CLS):
            r = c.post(f"/v2/repository/models/{model}/load")  # the fuzzer may have unloaded it
            assert r.status_code == 200, r.text
            r = c.post(
                "/v1/embeddings", json={"model": model, "input": ["a new day"], "encoding_format": "float"}
            )
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                r.json()["data"][0]["embedding"],
                fuzz_engine.embed(model, ["a new day"]).embeddings[0],
                rtol=1e-5,
                atol=1e-6,
            )


@given(texts=st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
def test_any_nonempty_text_embeds(fuzz_url: str, fuzz_engine: Any, texts: list[str]) -> None:
    """Valid requests of arbitrary Unicode (control characters, whitespace only, emoji) all succeed."""
    r = httpx.post(
        f"{fuzz_url}/v1/embeddings",
        json={"model": EMB, "input": texts, "encoding_format": "float"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    got = [d["embedding"] for d in r.json()["data"]]
    assert len(got) == len(texts)
    assert all(math.isfinite(x) for row in got for x in row)
    np.testing.assert_allclose(got, fuzz_engine.embed(EMB, texts).embeddings, rtol=1e-4, atol=1e-5)
