"""SIGTERM drains in-flight requests, closes the engine, then the process exits (a real subprocess)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from tests.server.fake_engine import fake_vector

ROOT = Path(__file__).resolve().parents[2]


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("ptmserve_http_requests_in_flight "):
            return float(line.split()[1]) - 1  # minus this /metrics request
    return 0.0


def test_sigterm_drains_in_flight_requests() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.server.launch_fake", "--delay", "1.0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            try:
                m = re.search(r"running on http://127\.0\.0\.1:(\d+)", lines.get(timeout=1))
            except queue.Empty:
                continue
            port = int(m.group(1)) if m else None
        assert port is not None, "the server did not start"
        url = f"http://127.0.0.1:{port}"
        texts = [f"in flight {i}" for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/v1/embeddings", json={"model": "emb", "input": t}, timeout=30)
                for t in texts
            ]
            while _in_flight(url) < 4:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            refused = False
            while not refused and not all(f.done() for f in futures):
                try:
                    httpx.get(f"{url}/v2/health/live", timeout=5)
                    time.sleep(0.02)
                except httpx.TransportError:
                    refused = True  # the listening socket closed: no new work is accepted
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        for r, t in zip(responses, texts, strict=True):
            np.testing.assert_allclose(r.json()["data"][0]["embedding"], fake_vector(t), rtol=1e-6)
        assert refused
        proc.wait(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM)
        out = proc.stdout.read()  # type: ignore[union-attr]
        assert "ENGINE CLOSED in_flight=0 completed=4" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
