"""A bounded fuzz run (schemathesis over /openapi.json, positive and negative cases): no 500, no crash.

Runs against a real server over the real engine with the tiny models. Path and body model names are
steered to the real models in half of the cases, so the fuzzer reaches inference, not only 404s.
"""

from __future__ import annotations

import math
import zlib

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ptmserve.server.app import create_app  # noqa: E402
from ptmserve.server.settings import ServerSettings  # noqa: E402
from tests.server.conftest import CLS, EMB  # noqa: E402
from tests.server.fake_engine import FakeEngine  # noqa: E402

# The OpenAPI document does not depend on the engine: take it from an app over the fake engine, and
# send the generated requests to the real server.
schema = schemathesis.openapi.from_dict(create_app(FakeEngine(), ServerSettings()).openapi())


def _steer(case) -> None:  # type: ignore[no-untyped-def]
    """Point about half of the cases at real models and the real version."""
    params = case.path_parameters or {}
    key = zlib.crc32((repr(sorted(params.items())) + repr(case.body)[:200]).encode())
    if "model" in params and key % 2 == 0:
        params["model"] = EMB if key % 4 == 0 else CLS
    if "version" in params and key % 3 == 0:
        params["version"] = "1"
    if isinstance(case.body, dict) and "model" in case.body and key % 2 == 0:
        case.body["model"] = EMB


@schema.parametrize()
@settings(
    max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)
def test_no_server_errors(case, real_url: str) -> None:  # type: ignore[no-untyped-def]
    _steer(case)
    response = case.call(base_url=real_url, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert "error" in response.json()


def test_server_still_up_after_fuzzing(real_url: str) -> None:
    assert httpx.get(f"{real_url}/v2/health/live").status_code == 200


@given(texts=st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
def test_any_nonempty_text_embeds(real_url: str, texts: list[str]) -> None:
    """Valid requests of arbitrary Unicode (control characters, whitespace only, emoji) all succeed."""
    r = httpx.post(
        f"{real_url}/v1/embeddings", json={"model": EMB, "input": texts, "encoding_format": "float"}
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == len(texts)
    assert all(math.isfinite(x) for d in data for x in d["embedding"])
