"""``TierRouter``: a Ray Serve request router that ranks replicas by where a model's weights are.

Ray Serve calls ``choose_replicas`` for each request; the ranks it returns are tried in order (within a
rank Ray takes the replica with the shortest queue that accepts). Here every rank holds one replica, in
the order ``ranking.rank_replicas`` gives: device tier, then host tier, then least loaded, with the
request's deadline deciding when a hot model spreads to a second replica.

What the router knows of each replica, newest first:

- the ``ReplicaState`` that came back with the replica's last answer to this process (``board``: the
  ingress records each one, so routing follows the tiers at once, as the worker pool's does);
- the replica's routing stats (``EngineReplica.record_routing_stats``, every
  ``request_routing_stats_period_s``), through Ray's controller;
- the requests in flight on it: those this router sent there and that have not completed (counted from
  the moment of the choice, so a burst routed at once sees itself), or Ray's queue length cache (which
  also counts other routers' requests), whichever is larger.

A model just sent to a replica that does not hold it is *pinned* there for ``PIN_SECONDS`` (until its
state shows it loaded): the requests that follow go to the replica loading it instead of starting a
second load elsewhere. The replica a model was last sent to is its *home*: when no replica holds it, it
goes back there, so that each model keeps to one replica. A ``ReplicaCall`` with a ``target`` goes to
that replica only (the ingress asks every replica for its metrics and tiers that way).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

import ptmserve.ray.board as board
from ptmserve.ray.calls import ReplicaCall, ReplicaState
from ptmserve.ray.ranking import ReplicaView, rank_replicas

logger = logging.getLogger(__name__)

PIN_SECONDS = 2.0
ROUTED_SECONDS = 600.0  # a routed request not completed by then is no longer counted


class TierRouter(RequestRouter):
    """Routes by tier, load and deadline (see the module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._pins: dict[str, tuple[str, float]] = {}  # model -> (replica id, pinned at)
        self._homes: dict[str, str] = {}  # model -> the replica it was last sent to
        # replica id -> {request id: when it was routed there}: this router's requests not yet completed,
        # counted from the moment of the choice (Ray's queue-length cache lags while a burst is routed)
        self._routed: dict[str, dict[str, float]] = {}
        self._routed_lock = threading.Lock()  # completions may be reported from another thread
        self.decisions: Counter[str] = Counter()  # why the first choice was chosen (see ``_decision``)
        board.routers.append(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        call = _call_of(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if call is not None and call.target is not None:
            chosen = by_id.get(call.target)
            return [[chosen]] if chosen is not None else []
        model = call.model if call is not None else None
        if model is None and pending_request is not None:
            model = pending_request.metadata.multiplexed_model_id or None
        views = [self._view(r) for r in candidate_replicas]
        slack = call.deadline - time.time() if call is not None and call.deadline is not None else None
        pinned = self._pinned(model, views)
        home = self._homes.get(model) if model is not None else None
        order = rank_replicas(model, views, slack=slack, pinned=pinned, home=home)
        if not order:
            return []
        if pending_request is not None:
            self._count_routed(order[0], pending_request.metadata.internal_request_id)
        if model is not None:
            first = next(v for v in views if v.id == order[0])
            self.decisions[_decision(model, first, views, pinned, home)] += 1
            self._homes[model] = first.id
            if model not in first.device:
                self._pins[model] = (first.id, time.monotonic())
        return [[by_id[i]] for i in order]

    def _count_routed(self, replica: str, request: str) -> None:
        with self._routed_lock:
            for routed in self._routed.values():  # chosen again (a retry): count it once, where it goes now
                routed.pop(request, None)
            self._routed.setdefault(replica, {})[request] = time.monotonic()

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        """Ray's hook: a request finished (or failed) on ``replica_id``."""
        super().on_request_completed(replica_id, internal_request_id)
        with self._routed_lock:
            for routed in self._routed.values():  # wherever it was counted (Ray may take a lower rank)
                if routed.pop(internal_request_id, None) is not None:
                    return

    def _routed_to(self, replica: str) -> int:
        """This router's requests on ``replica`` not yet completed (entries older than ``ROUTED_SECONDS``
        are dropped: a request cancelled before it was sent never completes)."""
        old = time.monotonic() - ROUTED_SECONDS
        with self._routed_lock:
            routed = self._routed.get(replica, {})
            for rid in [r for r, at in routed.items() if at < old]:
                del routed[rid]
            return len(routed)

    def _pinned(self, model: str | None, views: list[ReplicaView]) -> frozenset[str]:
        if model is None:
            return frozenset()
        pin = self._pins.get(model)
        if pin is None:
            return frozenset()
        replica, at = pin
        view = next((v for v in views if v.id == replica), None)
        if view is None or model in view.device or time.monotonic() - at > PIN_SECONDS:
            del self._pins[model]  # gone, loaded (its state says so from now on), or stale
            return frozenset()
        return frozenset({replica})

    def _view(self, replica: RunningReplica) -> ReplicaView:
        rid = replica.replica_id.unique_id
        state = ReplicaState.from_stats(replica.routing_stats or {})
        answered = board.state(rid)
        if answered is not None and (state is None or answered.at >= state.at):
            state = answered
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        if queued is None:
            queued = state.in_flight if state is not None else 0
        in_flight = max(queued, self._routed_to(rid))  # others' requests show in Ray's count only
        if state is None:
            return ReplicaView(rid, frozenset(), frozenset(), in_flight)
        return ReplicaView(
            rid,
            state.device,
            state.host,
            in_flight,
            state.seconds_per_request,
            state.load_seconds,
            state.device_free,
            state.device_bytes,
        )


def _call_of(pending_request: PendingRequest | None) -> ReplicaCall | None:
    if pending_request is None:
        return None
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, ReplicaCall):
            return arg
    return None


def _decision(
    model: str, first: ReplicaView, views: list[ReplicaView], pinned: frozenset[str], home: str | None
) -> str:
    """What routing did for one request: ``device`` (to a replica holding the model), ``pinned`` (to the
    one loading it), ``spread`` (to another, though a replica holds it: its queue would be late),
    ``home`` (a load, on the replica the model was last sent to), ``host`` (a load from a host tier),
    ``cold`` (a load from disk)."""
    if model in first.device:
        return "device"
    if first.id in pinned:
        return "pinned"
    if any(model in v.device for v in views):
        return "spread"
    if first.id == home:
        return "home"
    return "host" if model in first.host else "cold"
