"""``ptmserve serve --ray --replicas 2``: the command starts a local Ray instance, serves the repository
through Ray Serve on 127.0.0.1, and on SIGTERM removes the application and stops that Ray instance."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ptmserve[ray]'")

from tests.ray.conftest import GEN, A, samples  # noqa: E402
from tests.server.conftest import serve_process  # noqa: E402


def test_serve_ray_serves_and_stops_on_sigterm(ray_repo: Path, tmp_path: Path) -> None:
    flags = ("--ray", "--replicas", "2", "--dtype", "float32", "--kv-cache-memory", "4MiB")
    with serve_process(ray_repo, tmp_path / "serve.log", *flags, start_seconds=180) as server:
        r = httpx.post(f"{server.url}/v1/embeddings", json={"model": A, "input": "a new day"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 0, r.text
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": GEN, "prompt": "a new day", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        assert len(samples(server.url, "ptmserve_worker_up")) == 2
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve --ray did not stop on SIGTERM:\n{server.output()[-3000:]}")
    assert code == 0, server.output()[-3000:]
    assert "shutting down" in server.output()
