"""Which replica takes a request: tier first, then load, with deadlines. Pure Python, no Ray, no state.

For a request for model M with ``slack`` seconds left until its deadline, each replica gets an expected
finish time::

    finish = (in_flight + 1) * seconds_per_request + (0 if M is on its device else load_seconds)

A replica with M in its host tier pays a fraction of ``load_seconds`` (the copy, not the disk read);
figures a replica has not measured yet are the slowest the others measured. The ranking is:

1. replicas whose device tier holds M, or that M was just sent to (a load is on its way there: a second
   replica loading the same cold model would pay the same load again);
2. then replicas whose host tier holds M;
3. then the rest;

and within a tier first M's *home* (the replica M was last sent to: so each model keeps to one replica,
the replicas' engines each see a part of the models, and the device tiers together hold more distinct
models), then the replicas whose device budget has room for M (a load there evicts nothing), then the
fewest requests in flight, then the replica id (a stable order tests can predict).

Deadlines: when the first choice's expected finish would miss ``slack`` (times ``SAFETY``) and another
replica's would not, the best such replica (the earliest expected finish) moves to the front: a hot model
spreads to a second replica only when its holder's queue would make requests late. A copy that would evict
another model (the replica's device budget is full) is made only when the holder would miss the deadline
itself (not just its safety margin) and the copy finishes within ``EVICTING_SHARE`` of the slack, since
the evicted model costs a load later. Once spread, the model is on both devices, so both stay first
and share its traffic by load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SAFETY = 0.8  # a replica "meets" a deadline if it expects to finish within this share of the slack
EVICTING_SHARE = 0.5  # a copy that evicts another model must finish within this share of the slack
HOST_LOAD_SHARE = 0.3  # a load from the host tier costs this share of one from disk (copy only)
DEFAULT_SECONDS_PER_REQUEST = 0.02  # before a replica has measured its own
DEFAULT_LOAD_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows of one replica when it decides."""

    id: str
    device: frozenset[str]  # models on its device tier
    host: frozenset[str]  # models in its host tier
    in_flight: int  # requests sent to it and not answered
    seconds_per_request: float = 0.0  # 0: unknown
    load_seconds: float = 0.0  # 0: unknown
    free_bytes: int = -1  # bytes its device budget has left; -1: unknown
    device_bytes: Mapping[str, int] = field(default_factory=dict)  # bytes of each model on its device


def tier_of(model: str, view: ReplicaView, pinned: frozenset[str] = frozenset()) -> int:
    """0: on the device (or pinned: just sent there); 1: in the host tier; 2: neither."""
    if model in view.device or view.id in pinned:
        return 0
    return 1 if model in view.host else 2


def expected_finish(
    model: str, view: ReplicaView, pinned: frozenset[str] = frozenset(), prior: ReplicaView | None = None
) -> float:
    """Seconds until a request for ``model`` sent to ``view`` now would finish, by its own figures (those
    it has not measured yet taken from ``prior``, else the defaults)."""
    spr = (
        view.seconds_per_request or (prior.seconds_per_request if prior else 0) or DEFAULT_SECONDS_PER_REQUEST
    )
    load = view.load_seconds or (prior.load_seconds if prior else 0) or DEFAULT_LOAD_SECONDS
    switch = (0.0, HOST_LOAD_SHARE * load, load)[tier_of(model, view, pinned)]
    return (view.in_flight + 1) * spr + switch


def rank_replicas(
    model: str | None,
    views: Sequence[ReplicaView],
    *,
    slack: float | None = None,
    pinned: frozenset[str] = frozenset(),
    home: str | None = None,
) -> list[str]:
    """Replica ids, best first, for a request for ``model`` (None: by load only).

    Args:
        model: the model the request is for.
        views: the candidate replicas.
        slack: seconds until the request's deadline; None: no deadline to take into account.
        pinned: replicas ``model`` was just sent to (treated as holding it).
        home: the replica ``model`` was last sent to: among replicas that must load it, it goes first.
    """
    if model is None:
        return [v.id for v in sorted(views, key=lambda v: (v.in_flight, v.id))]
    size = model_size(model, views)

    def evicts(v: ReplicaView) -> bool:
        """A load of ``model`` there would evict another model (its device budget is short of it)."""
        if tier_of(model, v, pinned) == 0 or size is None or v.free_bytes < 0:
            return False
        return v.free_bytes < size

    def key(v: ReplicaView) -> tuple[int, bool, bool, int, str]:
        tier = tier_of(model, v, pinned)
        return (tier, tier > 0 and v.id != home, evicts(v), v.in_flight, v.id)

    order = sorted(views, key=key)
    if slack is None or len(order) < 2:
        return [v.id for v in order]
    budget = max(slack, 0.0) * SAFETY
    prior = _prior(views)

    def finish(v: ReplicaView) -> float:
        return expected_finish(model, v, pinned, prior)

    late = finish(order[0])
    if late > budget:
        # A copy that evicts another model costs that model a load later: only when the holder would
        # really miss the deadline, and the copy is well in time.
        meets = [
            v
            for v in order[1:]
            if finish(v) <= budget
            and (not evicts(v) or (late > slack and finish(v) <= EVICTING_SHARE * slack))
        ]
        if meets:
            best = min(meets, key=lambda v: (evicts(v), finish(v), v.id))
            order.remove(best)
            order.insert(0, best)
    return [v.id for v in order]


def model_size(model: str, views: Sequence[ReplicaView]) -> int | None:
    """``model``'s device bytes as a replica holding it reports them, else the median of the models the
    replicas hold (models of one deployment tend to be alike), else None."""
    sizes = [v.device_bytes[model] for v in views if model in v.device_bytes]
    if sizes:
        return max(sizes)
    every = sorted(b for v in views for b in v.device_bytes.values())
    return every[len(every) // 2] if every else None


def _prior(views: Sequence[ReplicaView]) -> ReplicaView:
    """What to assume of a replica that has not measured itself yet: the slowest figures measured by the
    others (the replicas run the same engine; assuming a newcomer fast would send it everything)."""
    return ReplicaView(
        "",
        frozenset(),
        frozenset(),
        0,
        max((v.seconds_per_request for v in views), default=0.0),
        max((v.load_seconds for v in views), default=0.0),
    )
