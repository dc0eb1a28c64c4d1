"""Fixtures for the Ray Serve tests: a repository of four tiny models and one local Ray instance per
test module (Ray takes seconds to start, so the tests of a module share it).

- ``ray_repo``: ``enc-a`` and ``enc-b`` (tiny BERT embedding models), ``enc-long`` (a tiny BERT with 512
  positions, so ``heavy_ids(n)`` makes real work) and ``gen`` (a tiny LLaMA-style decoder with a chat
  template).
- ``start_app(repo, **overrides)``: Ray (2 CPUs, a 512 MiB object store, no dashboard) with Serve
  listening on a free 127.0.0.1 port and the application running; yields the base URL; shuts Serve and
  Ray down.

The test modules skip themselves when Ray Serve is not installed (``pip install 'ptmserve[ray]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import free_socket

A, B, LONG, GEN = "enc-a", "enc-b", "enc-long", "gen"
MAX_INPUTS = 64  # the servers' --max-batch-inputs in these tests: the 9th input is a 413


@pytest.fixture(scope="session")
def ray_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository
    from tests.models.tiny import make_tiny_checkpoint
    from tests.models.tiny_decoder import make_tiny_decoder

    root = tmp_path_factory.mktemp("ray")
    repository = Repository(root / "repo")
    src = root / "src"
    a = make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=1, name="a")
    b = make_tiny_checkpoint(src, "bert", st_pooling="mean", seed=2, name="b")
    long = make_tiny_checkpoint(src, "bert", max_tokens=512, seed=3, name="long")
    import_checkpoint(repository, a, A)
    import_checkpoint(repository, b, B)
    import_checkpoint(repository, long, LONG)
    folder, _ = make_tiny_decoder(src / "gen", "llama-gqa-untied", context=512)
    import_checkpoint(repository, folder, name=GEN)
    return root / "repo"


def app_config(repo: Path, port: int, **engine: Any) -> Any:
    """The application's config for these tests: 2 replicas of one thread, float32."""
    from ptmserve.engine.engine import EngineSettings
    from ptmserve.ray import RayAppConfig
    from ptmserve.server.settings import ServerSettings

    settings = dataclasses.replace(
        EngineSettings(), dtype="float32", kv_cache_memory="4MiB", placement="device", **engine
    )
    server = ServerSettings(port=port, max_batch_inputs=MAX_INPUTS)
    return RayAppConfig(repo=str(repo), replicas=2, engine=settings, server=server, threads_per_replica=1)


@contextlib.contextmanager
def start_app(repo: Path, **engine: Any) -> Iterator[str]:
    """A local Ray instance serving the application on a free port (see the module docstring)."""
    import ray
    from ray import serve

    from ptmserve.ray import build

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(app_config(repo, port, **engine)), name="ptmserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _ok(f"{url}/v2/health/ready"), 60), "the ingress did not become ready"
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(cond: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def samples(url: str, name: str, **labels: str) -> dict[str, float]:
    """replica id -> the sum of the samples of ``name`` on /metrics whose labels include ``labels``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out
