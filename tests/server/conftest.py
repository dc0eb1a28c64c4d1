"""Shared server fixtures: real uvicorn servers on free 127.0.0.1 ports, in a thread of the test process,
and real ``ptmserve serve`` processes.

- ``real_url`` / ``real_engine``: the app over a real ``Engine`` opened on a repository holding two tiny
  random models: ``tiny-emb`` (a BERT embedding model, mean pooling) and ``tiny-cls`` (a BERT classifier
  with 3 labels). Built once per session.
- ``heavy_repo``: ``tiny-long`` (positions for 512 tokens, so one request of ``heavy_ids(128)`` keeps the
  engine busy for about half a second) next to ``tiny-emb``: tests that need requests in flight or queued
  make them with real work instead of pausing a fake.
- ``serve_process``: ``python -m ptmserve.cli.main serve`` in its own process, waited on until ready.
- ``fake_url``: the app over ``FakeEngine``, kept only for ``test_bench_http.py`` (see fake_engine.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ptmserve.server.dataplane import DataPlane
from ptmserve.server.serve import build_server
from ptmserve.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine

EMB, CLS, LONG = "tiny-emb", "tiny-cls", "tiny-long"
ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond: Any, seconds: float = 20.0) -> bool:
    """Poll ``cond`` until it holds or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def free_socket() -> socket.socket:
    """A listening-ready TCP socket bound to a free port on 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class LiveServer:
    url: str
    plane: DataPlane  # the app's data plane (tests flip ``draining`` on it)


@contextlib.contextmanager
def running_server(engine: Any, **settings: Any) -> Iterator[str]:
    """Serve ``engine`` in a background thread; yields the base URL; stops the server on exit."""
    with live_server(engine, **settings) as live:
        yield live.url


@contextlib.contextmanager
def live_server(engine: Any, **settings: Any) -> Iterator[LiveServer]:
    """Like ``running_server``, yielding the URL and the app's ``DataPlane``."""
    sock = free_socket()
    port = sock.getsockname()[1]
    cfg = ServerSettings(host="127.0.0.1", port=port, log_level="warning", **settings)
    server = build_server(engine, cfg, owns_engine=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", server.plane)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """The app over ``FakeEngine``: only ``test_bench_http.py`` (the benchmark's load generator) uses it."""
    with running_server(FakeEngine()) as url:
        yield url


# ------------------------------------------------------------------------------------ real engine


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``tiny-emb`` and ``tiny-cls`` imported from tiny random checkpoints."""
    from ptmserve.store import importer, repository
    from tests.models.tiny import make_tiny_checkpoint

    src = tmp_path_factory.mktemp("ckpt")
    root = tmp_path_factory.mktemp("repo")
    repo = repository.Repository(root)
    emb = make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=1, name="emb")
    cls = make_tiny_checkpoint(src, "bert", with_head=True, seed=2, name="cls")
    importer.import_checkpoint(repo, emb, EMB)
    importer.import_checkpoint(repo, cls, CLS)
    return root


def open_engine(repo: Path, **kwargs: Any) -> Any:
    from ptmserve.engine.engine import Engine

    return Engine.open(repo, device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="session")
def real_engine(tiny_repo: Path) -> Iterator[Any]:
    engine = open_engine(tiny_repo)
    yield engine
    engine.close(drain_seconds=5)


@pytest.fixture(scope="session")
def real_url(real_engine: Any) -> Iterator[str]:
    with running_server(real_engine) as url:
        yield url


# ---------------------------------------------------------------------------------- heavy requests


@pytest.fixture(scope="session")
def heavy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``tiny-long`` (512 positions: real work to keep the engine busy) and ``tiny-emb``."""
    from ptmserve.store import importer, repository
    from tests.models.tiny import make_tiny_checkpoint

    src = tmp_path_factory.mktemp("ckpt-heavy")
    root = tmp_path_factory.mktemp("repo-heavy")
    repo = repository.Repository(root)
    long = make_tiny_checkpoint(src, "bert", max_tokens=512, seed=3, name="long")
    emb = make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=1, name="emb")
    importer.import_checkpoint(repo, long, LONG)
    importer.import_checkpoint(repo, emb, EMB)
    return root


def heavy_ids(n: int, length: int = 512, seed: int = 0) -> list[list[int]]:
    """``n`` token-id inputs of ``length`` ids each (valid for the tiny vocabulary).

    For ``tiny-long``, ``heavy_ids(128)`` is about half a second of compute on one core.
    """
    rng = random.Random(seed)
    return [[rng.randrange(5, 190) for _ in range(length)] for _ in range(n)]


# -------------------------------------------------------------------------------- serve processes


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with contextlib.closing(free_socket()) as sock:
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path  # the process's stdout and stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def clean_env() -> dict[str, str]:
    """This process's environment without ``PTMSERVE_API_KEY`` (which would turn auth on in ``serve``)."""
    return {k: v for k, v in os.environ.items() if k != "PTMSERVE_API_KEY"}


@contextlib.contextmanager
def serve_process(repo: Path, log: Path, *flags: str, start_seconds: float = 120) -> Iterator[ServeProcess]:
    """Run ``ptmserve serve --repo REPO --port <free> FLAGS...`` until ``/v2/health/ready`` answers 200.

    Yields the running process; kills it on exit if it is still running.
    """
    port = free_port()
    command = [sys.executable, "-m", "ptmserve.cli.main", "serve", "--repo", str(repo), "--port", str(port)]
    if "--workers" not in flags:  # these tests are of the one-process server; the pool has its own
        command += ["--workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, *flags], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean_env()
        )
    server = ServeProcess(proc, f"http://127.0.0.1:{port}", log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"ptmserve serve exited with {proc.returncode}:\n{server.output()[-3000:]}"
                )
            try:
                return httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(ready, start_seconds), (
            f"ptmserve serve did not become ready:\n{server.output()[-3000:]}"
        )
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
