from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ptmserve.memory.manager import WeightManager
from ptmserve.memory.records import MemoryEvent
from ptmserve.store.repository import Repository


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository(tmp_path / "repo")


@pytest.fixture
def make_manager(repo: Repository) -> Iterator[Callable[..., WeightManager]]:
    """Build WeightManagers over ``repo`` (closed after the test); each records its events."""
    made: list[WeightManager] = []

    def make(**kw) -> WeightManager:
        events: list[MemoryEvent] = []
        kw.setdefault("device", "cpu")
        kw.setdefault("dtype", None)
        kw.setdefault("host_budget", "64MiB")
        kw.setdefault("device_budget", "64MiB")
        m = WeightManager(repo, listeners=[events.append], **kw)
        m.events = events  # type: ignore[attr-defined]
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every memory test runs on one torch thread (``tests/conftest.py``)."""
