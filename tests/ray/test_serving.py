"""ptmserve on Ray Serve (``ptmserve.ray``): two engine replicas behind the ingress, on a local Ray
instance, with real clients. One application serves the module; the tests run in file order and the last
one kills a replica.

Which replica served what is read from ``/metrics``: every engine family carries a ``worker`` label (the
replica's id), and ``ptmserve_worker_pid`` gives each replica's process.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ptmserve[ray]'")

from tests.ray.conftest import GEN, LONG, MAX_INPUTS, A, B, samples, start_app, wait_for  # noqa: E402
from tests.server.conftest import heavy_ids, open_engine, running_server  # noqa: E402

SLOW = 120_000_000  # µs: a deadline no test request comes near, so that a loaded machine gives no 504


@pytest.fixture(scope="module")
def url(ray_repo: Path) -> Iterator[str]:
    with start_app(ray_repo) as base:
        yield base


def _embed(url: str, model: str, inputs: Any, **extra: Any) -> httpx.Response:
    body = {"model": model, "input": inputs, "timeout": SLOW, **extra}
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)


def test_four_models_through_openai_and_triton(url: str, ray_repo: Path) -> None:
    import openai
    import tritonclient.http as triton

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == sorted([A, B, LONG, GEN])
    engine = open_engine(ray_repo)
    try:
        for model in (A, B, LONG):
            got = client.embeddings.create(
                model=model, input=["a new day", "hello"], extra_body={"timeout": SLOW}
            )
            want = engine.embed(model, ["a new day", "hello"]).embeddings
            np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
        triton_client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert triton_client.is_server_ready() and triton_client.is_model_ready(A)
        text = triton.InferInput("TEXT", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"a new day", b"hello"], dtype=object))
        out = triton_client.infer(B, [text], priority=2).as_numpy("EMBEDDING")  # batch: a long deadline
        np.testing.assert_allclose(out, engine.embed(B, ["a new day", "hello"]).embeddings, atol=1e-5)
        reply = client.chat.completions.create(
            model=GEN, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, seed=1
        )
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    finally:
        engine.close(drain_seconds=1)


def test_a_stream_through_the_handle_matches_the_whole_answer(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    ask = {"model": GEN, "messages": [{"role": "user", "content": "a new day"}], "max_tokens": 12}
    ask |= {"temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**ask)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) >= 2  # it streamed, not one piece at the end


def test_repeated_requests_stay_on_the_replica_that_holds_the_model(url: str) -> None:
    before = samples(url, "ptmserve_requests_total", model=B, outcome="success")
    for _ in range(6):
        assert _embed(url, B, "again").status_code == 200
    after = samples(url, "ptmserve_requests_total", model=B, outcome="success")
    grew = sorted(after.get(r, 0) - before.get(r, 0) for r in after)
    assert grew in ([6.0], [0.0, 6.0]), (before, after)  # all on one replica
    loads = samples(url, "ptmserve_model_loads_total", model=B)
    assert sum(loads.values()) == 1.0, loads  # loaded once, on one replica, since the module began


def test_a_hot_model_spreads_to_a_second_replica_when_its_queue_would_miss_deadlines(url: str) -> None:
    ids = heavy_ids(64, length=512)  # about a quarter of a second of one core
    for _ in range(3):  # the holder measures its time per request
        assert _embed(url, LONG, ids).status_code == 200
    before = samples(url, "ptmserve_requests_total", model=LONG)  # every outcome: where requests went
    assert len([v for v in before.values() if v]) == 1, before  # one holder so far

    def one(_: int) -> int:
        return _embed(url, LONG, ids, timeout=1_500_000).status_code

    with ThreadPoolExecutor(12) as pool:  # 3 s of work for one replica, deadlines 1.5 s away
        codes = list(pool.map(one, range(12)))
    assert set(codes) <= {200, 504}, codes
    after = samples(url, "ptmserve_requests_total", model=LONG)
    grew = {r: after.get(r, 0) - before.get(r, 0) for r in after}
    assert len([g for g in grew.values() if g > 0]) == 2, (grew, codes)  # both replicas took some
    assert codes.count(200) >= 4, codes


def _errors(base: str) -> list[tuple[int, Any]]:
    """The answers to one request per error of the table, both protocols."""
    infer = f"{base}/v2/models/{A}/infer"
    text = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    requests = [
        ("POST", f"{base}/v1/embeddings", {"model": A, "input": []}),  # 400: empty input
        ("POST", infer, {"inputs": [{**text, "datatype": "FP32"}]}),  # 400: wrong datatype
        ("POST", f"{base}/v1/embeddings", {"model": "nope", "input": "a"}),  # 404
        ("POST", f"{base}/v2/models/nope/infer", {"inputs": [text]}),  # 404
        ("GET", f"{base}/v2/models/{A}/versions/7", None),  # 404: no such version
        ("POST", f"{base}/v1/embeddings", {"model": A, "input": ["a"] * (MAX_INPUTS + 1)}),  # 413
        ("POST", infer, {"inputs": [{**text, "shape": [MAX_INPUTS + 1], "data": ["a"] * (MAX_INPUTS + 1)}]}),
        ("POST", f"{base}/v1/embeddings", {"model": A, "input": "a", "timeout": 1}),  # 504
        ("POST", infer, {"inputs": [text], "parameters": {"timeout": 1}}),  # 504
    ]
    out = []
    for method, where, body in requests:
        r = httpx.request(method, where, json=body, timeout=60)
        out.append((r.status_code, re.sub(r"request \d+ ", "request N ", r.text)))  # engines number them
    return out


def test_the_error_table_matches_ptmserve_serve(url: str, ray_repo: Path) -> None:
    from ptmserve.server.settings import ServerSettings

    engine = open_engine(ray_repo, placement="device")
    try:
        with running_server(engine, max_batch_inputs=MAX_INPUTS) as single:
            want = _errors(single)
    finally:
        engine.close(drain_seconds=1)
    assert [s for s, _ in want] == [400, 400, 404, 404, 404, 413, 413, 504, 504]
    assert _errors(url) == want
    assert ServerSettings().max_batch_inputs > MAX_INPUTS  # the 413s come from the settings above


def test_metrics_and_tiers_name_every_replica(url: str) -> None:
    up = samples(url, "ptmserve_worker_up")
    assert len(up) == 2 and set(up.values()) == {1.0}, up
    resident = samples(url, "ptmserve_resident_bytes", tier="device")
    assert set(resident) == set(up) and all(v > 0 for v in resident.values()), resident
    stats = httpx.get(f"{url}/v2/models/{A}/stats", timeout=30).json()["model_stats"][0]
    assert stats["name"] == A and stats["inference_stats"]["success"]["count"] >= 1


def test_a_killed_replica_fails_its_requests_clearly_and_comes_back(url: str) -> None:
    ids = heavy_ids(32, length=512)
    assert _embed(url, LONG, ids[:1]).status_code == 200
    pids = samples(url, "ptmserve_worker_pid")
    served = samples(url, "ptmserve_requests_total", model=LONG, outcome="success")
    holder = max(served, key=lambda r: served[r])
    victim = int(pids[holder])

    def one(_: int) -> httpx.Response:
        return _embed(url, LONG, ids)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        answers = [f.result(timeout=120) for f in futures]  # none hangs
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            error = r.json()["error"]
            assert error["code"] == "not_ready" and "replica" in error["message"], error

    def back() -> bool:
        now = samples(url, "ptmserve_worker_pid")
        return len(now) == 2 and victim not in {int(p) for p in now.values()}

    assert wait_for(back, 90), "Ray did not start a new replica"
    assert _embed(url, LONG, ids[:1]).status_code == 200
