"""SIGTERM on a real ``ptmserve serve`` process: stop accepting, drain what is in flight, exit.

The server runs the real engine on ``tiny-long``; twelve requests of real work (128 inputs of 512 token
ids each, about half a second of compute apiece on an idle core) are in flight when SIGTERM arrives,
more than the 3 s drain allows. Each must end as a success or as the documented 503 with the error
table's JSON body, never as a dropped connection, a plain-text error or a 500; and the process must exit.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LONG, heavy_ids, serve_process, wait_for

N_REQUESTS, N_INPUTS, DRAIN_SECONDS = 12, 128, 3
SLOW = 120_000_000  # µs: an explicit deadline, so that no answer is a 504 on a loaded machine


def _body(i: int) -> tuple[str, dict]:
    """Request ``i``: OpenAI for even ``i``, KServe for odd ``i``, both with token ids."""
    ids = heavy_ids(N_INPUTS, seed=i)
    if i % 2 == 0:
        return "/v1/embeddings", {"model": LONG, "input": ids, "encoding_format": "base64", "timeout": SLOW}
    data = {"name": "INPUT_IDS", "datatype": "INT64", "shape": [N_INPUTS, len(ids[0])], "data": ids}
    return f"/v2/models/{LONG}/infer", {"inputs": [data], "parameters": {"timeout": SLOW}}


def _post(url: str, path: str, body: dict) -> httpx.Response | Exception:
    try:
        return httpx.post(f"{url}{path}", json=body, timeout=120)
    except httpx.HTTPError as exc:  # reported by the assertion, not raised from the worker thread
        return exc


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ptmserve_http_requests_in_flight "):
            return float(line.split()[1]) - 1  # minus this /metrics request
    return 0.0


def _refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=5)
    except httpx.TransportError:
        return True
    return False


def _outcome(path: str, r: httpx.Response | Exception) -> str:
    """``"ok"`` or ``"drained"`` when ``r`` is one of the two allowed answers; else why it is not."""
    if isinstance(r, Exception):
        return f"{path}: no answer ({type(r).__name__}: {r})"
    what = f"{path}: {r.status_code} {r.headers.get('content-type')} {r.text[:300]!r}"
    if r.status_code == 200:
        n = len(r.json()["data"]) if path.startswith("/v1") else r.json()["outputs"][0]["shape"][0]
        return "ok" if n == N_INPUTS else what
    if r.status_code != 503 or not r.headers.get("content-type", "").startswith("application/json"):
        return what
    error = r.json().get("error")
    if path.startswith("/v1"):
        good = (
            isinstance(error, dict)
            and error.get("type") == "server_error"
            and error.get("code") == "not_ready"
        )
        good = good and set(error) == {"message", "type", "param", "code"}
    else:
        good = isinstance(error, str) and bool(error)
    return "drained" if good else what


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits(heavy_repo: Path, tmp_path: Path) -> None:
    flags = ("--dtype", "float32", "--drain-seconds", str(DRAIN_SECONDS))
    with serve_process(heavy_repo, tmp_path / "serve.log", *flags) as server:
        requests = [_body(i) for i in range(N_REQUESTS)]
        with ThreadPoolExecutor(N_REQUESTS) as pool:
            futures = [pool.submit(_post, server.url, path, body) for path, body in requests]
            assert wait_for(lambda: _in_flight(server.url) >= N_REQUESTS, 60), "requests never got in flight"
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # The listening socket closes at once: new work is refused while the old work drains.
            refused = wait_for(lambda: _refuses_connections(server.url), 10)
            responses = [f.result() for f in futures]
        returncode = server.proc.wait(timeout=60)
        exit_seconds = time.monotonic() - signalled
        log = server.output()

    outcomes = [_outcome(path, r) for (path, _), r in zip(requests, responses, strict=True)]
    bad = [o for o in outcomes if o not in ("ok", "drained")]
    assert not bad, (
        f"{len(bad)} of {N_REQUESTS} requests got neither a success nor the JSON 503 "
        f"({outcomes.count('ok')} succeeded, {outcomes.count('drained')} drained):\n"
        + "\n".join(bad)
        + "\n--- server log ---\n"
        + log[-3000:]
    )
    assert refused, "the server kept accepting connections after SIGTERM"
    assert returncode in (0, -signal.SIGTERM), log[-3000:]
    # The drain is bounded: uvicorn's grace period, then the engine's own drain, each DRAIN_SECONDS.
    assert exit_seconds < 2 * DRAIN_SECONDS + 20, f"exited {exit_seconds:.1f} s after SIGTERM"
    assert "Traceback" not in log, log[-3000:]
