"""The event loop stays responsive while a large request is tokenized (a real server, a real engine)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import EMB, open_engine, running_server


def test_health_answers_within_50ms_while_256_long_texts_are_tokenized(tiny_repo: Path) -> None:
    engine = open_engine(tiny_repo)
    try:
        with running_server(engine) as url, httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/v1/embeddings", json={"model": EMB, "input": "warm"}).status_code == 200
            texts = [("the man said hello to the water " * 320)[:10_000] for _ in range(256)]
            big: dict = {}

            def send_big() -> None:
                with httpx.Client(base_url=url, timeout=120) as c:
                    big["response"] = c.post("/v1/embeddings", json={"model": EMB, "input": texts})

            sender = threading.Thread(target=send_big)
            sender.start()
            latencies = []
            while sender.is_alive() and len(latencies) < 400:
                t0 = time.perf_counter()
                assert http.get("/v2/health/live").status_code == 200
                latencies.append(time.perf_counter() - t0)
            sender.join(120)
            assert big["response"].status_code == 200, big["response"].text
            assert len(big["response"].json()["data"]) == 256
            assert len(latencies) >= 3, "the large request finished before health could be probed"
            assert max(latencies) < 0.05, f"health took up to {max(latencies) * 1e3:.0f} ms"
    finally:
        engine.close(drain_seconds=5)
