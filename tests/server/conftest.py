"""Shared server fixtures: real uvicorn servers on free 127.0.0.1 ports, in a thread of the test process.

- ``fake_url``: the app over ``FakeEngine`` (deterministic, controllable), no auth.
- ``real_url`` / ``real_engine``: the app over a real ``Engine`` opened on a repository holding two tiny
  random models: ``tiny-emb`` (a BERT embedding model, mean pooling) and ``tiny-cls`` (a BERT classifier
  with 3 labels). Built once per session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ptmserve.server.dataplane import DataPlane
from ptmserve.server.serve import build_server
from ptmserve.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine

EMB, CLS = "tiny-emb", "tiny-cls"


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
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_url(fake_engine: FakeEngine) -> Iterator[str]:
    with running_server(
        fake_engine, max_batch_inputs=16, max_body_bytes=64 * 1024, max_input_length=1000
    ) as url:
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
