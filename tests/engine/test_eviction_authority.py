"""One authority over what leaves memory: the weight manager evicts in the scheduler's order."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.memory.policy import RankedPolicy
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint


def test_ranked_policy_follows_the_given_order_and_falls_back_to_lru() -> None:
    policy = RankedPolicy()
    for m in ("a", "b", "c"):
        policy.touch(m)
    policy.follow(["c", "a", "b"])
    assert policy.victim("device", ["a", "b"]) == "a"
    assert policy.victim("host", ["b", "c"]) == "c"
    assert policy.victim("device", ["d", "b"]) == "b"  # ranked first
    assert policy.victim("device", ["d", "e"]) == "d"  # unranked: least recently used (never touched)
    assert policy.victim("device", []) is None


class _Recorder(RankedPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.choices: list[tuple[str, list[str], dict[str, int]]] = []

    def victim(self, tier: str, candidates: Sequence[str]) -> str | None:
        choice = super().victim(tier, candidates)
        self.choices.append((tier, list(candidates), dict(self._rank)))
        return choice


@pytest.mark.parametrize("policy", ["fastptm", "fifo-lru"])
def test_every_eviction_the_manager_makes_follows_the_scheduler(tmp_path, policy: str, monkeypatch) -> None:  # noqa: ANN001
    repo = Repository(tmp_path / "repo")
    for i in range(4):
        src = make_tiny_checkpoint(tmp_path / "ck", "bert", seed=i, name=f"m{i}")
        import_checkpoint(repo, src, f"m{i}", dtype="float32")
    size = sum(e.nbytes for e in repo.manifest("m0").tensors)
    recorder = _Recorder()
    monkeypatch.setattr("ptmserve.engine.engine.RankedPolicy", lambda: recorder)
    settings = EngineSettings(dtype="float32", policy=policy, device_memory=2 * size, host_memory=3 * size)
    with Engine(repo, settings) as engine:
        for name in ["m0", "m1", "m2", "m3", "m0", "m2", "m1", "m3"] * 2:
            engine.embed(name, ["a short text"])
        evictions = engine.metrics.evictions
        host_evictions = sum(evictions.labels(f"m{i}", "host")._value.get() for i in range(4))
    assert host_evictions > 0  # the host tier holds 3 of the 4: the manager had to choose
    assert recorder.choices
    for _tier, candidates, rank in recorder.choices:
        assert any(c in rank for c in candidates), "a victim chosen without the scheduler's order"
