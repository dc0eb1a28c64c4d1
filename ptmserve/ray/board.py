"""What the routers of this process know of the replicas beyond Ray's own view: process-wide state.

Kept apart from ``router.py`` because Ray pickles the router's module by value (its globals travel with
the class); this module is imported by reference, so the ingress and the routers share one board.
"""

from __future__ import annotations

import threading
from typing import Any

from ptmserve.ray.calls import ReplicaState

_lock = threading.Lock()
# replica id -> the newest state one of its answers carried (the ingress records them)
_states: dict[str, ReplicaState] = {}
# the routers this process made (``TierRouter`` instances), so the ingress can list the running replicas
routers: list[Any] = []


def record(state: ReplicaState) -> None:
    """Keep ``state`` if it is newer than what the board holds for its replica."""
    with _lock:
        seen = _states.get(state.replica)
        if seen is None or seen.at <= state.at:
            _states[state.replica] = state


def state(replica: str) -> ReplicaState | None:
    with _lock:
        return _states.get(replica)


def states() -> list[ReplicaState]:
    with _lock:
        return list(_states.values())


def routes(app: str, deployment: str) -> bool:
    """Whether a router of this process routes that deployment (a ``TierRouter`` made for its handle)."""
    return any(_routes(router, app, deployment) for router in list(routers))


def running_replicas(app: str, deployment: str) -> list[str]:
    """The ids of the deployment's replicas this process's routers can send to now."""
    ids: set[str] = set()
    for router in list(routers):
        if _routes(router, app, deployment):
            ids.update(r.unique_id for r in router.curr_replicas)
    return sorted(ids)


def _routes(router: Any, app: str, deployment: str) -> bool:
    did = router._deployment_id
    return did.app_name == app and did.name == deployment
