"""Which model leaves a memory tier when room is needed.

The weight manager asks its policy for a victim whenever a load needs bytes that a tier does not have
free. It only offers candidates that may go (no work in flight, not loading). The scheduler can
replace the default LRU with a policy that knows the queues (for example: never evict a model whose
requests are due soon), or drive eviction itself through ``WeightManager.evict``/``prefetch``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

HOST = "host"
DEVICE = "device"


class EvictionPolicy(Protocol):
    """The interface the weight manager calls; every method must be cheap and thread-safe."""

    def touch(self, model: str) -> None:
        """``model`` was used (acquired or prefetched): it is now the most recently used."""

    def forget(self, model: str) -> None:
        """``model`` left every tier; the policy may drop what it knows about it."""

    def victim(self, tier: str, candidates: Sequence[str]) -> str | None:
        """The candidate to evict next from ``tier`` ("host" or "device"), or None to evict none.

        ``candidates`` holds only models that may be evicted now. Returning None makes the load that
        needs the room wait for models in use to be released.
        """
        ...


class LruPolicy:
    """Evict the least recently used candidate; models never touched count as oldest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: OrderedDict[str, None] = OrderedDict()  # oldest first

    def touch(self, model: str) -> None:
        with self._lock:
            self._order.pop(model, None)
            self._order[model] = None

    def forget(self, model: str) -> None:
        with self._lock:
            self._order.pop(model, None)

    def victim(self, tier: str, candidates: Sequence[str]) -> str | None:
        if not candidates:
            return None
        with self._lock:
            rank = {name: i for i, name in enumerate(self._order)}
        return min(candidates, key=lambda name: rank.get(name, -1))


class RankedPolicy:
    """Evict in an order someone else decides (the scheduler's, ``follow``), so that one authority says
    what leaves memory. Candidates the order does not name (models that arrived after it was given) go
    last, least recently used first."""

    def __init__(self) -> None:
        self._lru = LruPolicy()
        self._rank: dict[str, int] = {}

    def follow(self, order: Sequence[str]) -> None:
        """From now on evict in ``order`` (first to evict first); any thread."""
        self._rank = {name: i for i, name in enumerate(order)}  # one assignment: readers see old or new

    def touch(self, model: str) -> None:
        self._lru.touch(model)

    def forget(self, model: str) -> None:
        self._lru.forget(model)

    def victim(self, tier: str, candidates: Sequence[str]) -> str | None:
        rank = self._rank
        ranked = [c for c in candidates if c in rank]
        if ranked:
            return min(ranked, key=rank.__getitem__)
        return self._lru.victim(tier, candidates)
