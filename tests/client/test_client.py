"""``ptmserve.client`` (sync and async) against the real server over the real engine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from ptmserve import errors
from ptmserve.client import AsyncClient, Client, Health, ServerError
from ptmserve.client.calls import raise_for_status
from tests.models.tiny import TINY_TEXTS
from tests.server.conftest import CLS, EMB, open_engine, running_server

TEXTS = list(TINY_TEXTS)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sync_embed_classify_models_health(real_url: str, real_engine: Any) -> None:
    with Client(real_url) as c:
        got = c.embed(EMB, TEXTS)
        want = real_engine.embed(EMB, TEXTS)
        _close(got.embeddings, want.embeddings)
        assert got.prompt_tokens == want.prompt_tokens
        _close(c.embed(EMB, TEXTS[0]).embeddings, want.embeddings[:1])
        ids = [[2, 10, 11, 12, 3], [2, 20, 3]]  # ragged: sent as INPUT_IDS + ATTENTION_MASK
        _close(c.embed(EMB, ids).embeddings, real_engine.embed(EMB, ids).embeddings)
        _close(c.embed(EMB, ids[0]).embeddings, real_engine.embed(EMB, ids[:1]).embeddings)
        cls = c.classify(CLS, TEXTS, priority=2, timeout_us=30_000_000)
        ref = real_engine.classify(CLS, TEXTS)
        _close(cls.logits, ref.logits)
        assert cls.labels == ref.labels
        assert {m.name: m.state for m in c.models()} == {EMB: "READY", CLS: "READY"}
        assert c.metadata(CLS)["outputs"][1]["name"] == "LOGITS"
        assert c.health() == Health(live=True, ready=True)


def test_sync_typed_errors(real_url: str) -> None:
    with Client(real_url) as c:
        with pytest.raises(errors.ModelNotFound):
            c.embed("no-such-model", ["a"])
        with pytest.raises(errors.InvalidInput, match="classification head|no output"):
            c.classify(EMB, ["a"])
        with pytest.raises(errors.InvalidInput, match="empty string"):
            c.embed(EMB, ["a", ""])
        with pytest.raises(errors.InvalidInput):
            c.embed(EMB, [])
        with pytest.raises(errors.DeadlineExceeded):
            c.embed(EMB, ["a"], timeout_us=1)


def test_status_mapping() -> None:
    for status, cls in [(400, errors.InvalidInput), (401, errors.Unauthorized), (404, errors.ModelNotFound),
                        (413, errors.PayloadTooLarge), (429, errors.Overloaded), (503, errors.NotReady),
                        (504, errors.DeadlineExceeded)]:  # fmt: skip
        with pytest.raises(cls, match="why"):
            raise_for_status(status, b'{"error": "why"}')
    with pytest.raises(ServerError) as err:
        raise_for_status(500, b'{"error": {"message": "internal", "type": "server_error"}}')
    assert err.value.status == 500 and err.value.message == "internal"
    raise_for_status(200, b"")


def test_async_client(real_url: str, real_engine: Any) -> None:
    async def go() -> None:
        async with AsyncClient(real_url) as c:
            results = await asyncio.gather(*[c.embed(EMB, [t]) for t in TEXTS])
            for r, t in zip(results, TEXTS, strict=True):
                _close(r.embeddings, real_engine.embed(EMB, [t]).embeddings)
            cls = await c.classify(CLS, TEXTS[:2])
            assert cls.labels == real_engine.classify(CLS, TEXTS[:2]).labels
            assert len(await c.models()) == 2
            assert (await c.health()).ready
            with pytest.raises(errors.ModelNotFound):
                await c.embed("no-such-model", "a")

    asyncio.run(go())


def test_auth_and_explicit_control(tiny_repo: Any) -> None:
    engine = open_engine(tiny_repo, model_control="explicit")
    try:
        with running_server(engine, api_key="k3y") as url:
            with Client(url) as anonymous:
                assert anonymous.health() == Health(live=True, ready=True)  # health needs no key
                with pytest.raises(errors.Unauthorized):
                    anonymous.models()
            with Client(url, api_key="wrong") as wrong, pytest.raises(errors.Unauthorized):
                wrong.embed(EMB, "a")
            with Client(url, api_key="k3y") as c:
                with pytest.raises(errors.NotReady):
                    c.embed(EMB, "a")
                c.load(EMB)
                assert {m.name: m.state for m in c.models()}[EMB] == "READY"
                _close(c.embed(EMB, TEXTS).embeddings, engine.embed(EMB, TEXTS).embeddings)
                c.unload(EMB)
                with pytest.raises(errors.NotReady):
                    c.embed(EMB, "a")
    finally:
        engine.close(drain_seconds=5)


def test_health_of_an_unreachable_server() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as c:
        assert c.health() == Health(live=False, ready=False)


def test_the_client_imports_neither_the_server_nor_its_framework() -> None:
    """``ptmserve.client`` shares ``ptmserve.protocol`` with the server; it does not import the server."""
    code = (
        "import json, sys; import ptmserve.client; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'fastapi', 'uvicorn', 'torch') or m.startswith('ptmserve.server'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []
