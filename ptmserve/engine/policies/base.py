"""What every scheduling policy shares: the context it decides in, the plan it returns, batch forming,
expiry, and LRU eviction. Policies decide; ``Scheduler`` applies (queues, memory room, prefetch budget).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from ptmserve.engine.costs import CostModel, Tier
from ptmserve.engine.requests import Request, RequestClass, RequestQueues

if TYPE_CHECKING:
    from ptmserve.engine.scheduler import SchedulerLimits, Step, TierView

REALTIME, BATCH = RequestClass.REALTIME, RequestClass.BATCH


class StepKind(str, Enum):
    """Why a step's batch was chosen."""

    REALTIME = "realtime"  # for real-time work (it may carry batch-class fill)
    BATCH = "batch"  # batch-class work in spare capacity
    FORCED = "forced"  # batch-class work owed by the starvation bound, ahead of waiting real-time work
    IDLE = "idle"  # nothing runnable now (only expired requests to fail)


@dataclass(slots=True)
class ModelStats:
    """What the scheduler remembers about one model between steps."""

    last_used: float = -math.inf  # last time a step ran it or a load of it finished
    _count: float = 0.0  # arrivals, exponentially decayed to ``_t``
    _t: float = 0.0

    def arrive(self, now: float, window: float) -> None:
        self._count = self._count * math.exp(-(now - self._t) / window) + 1.0
        self._t = now

    def rate(self, now: float, window: float) -> float:
        """Recent arrivals per second (exponentially weighted over ``window`` seconds)."""
        return self._count * math.exp(-max(0.0, now - self._t) / window) / window


@dataclass(slots=True)
class Plan:
    """A candidate step a policy proposes; the scheduler takes the first one it can make room for."""

    model: str
    batch: list[Request]  # in execution order; may be empty when every candidate request expired
    kind: StepKind


class Context:
    """The world as one ``schedule`` call sees it, with the cost questions policies ask."""

    def __init__(
        self,
        now: float,
        view: TierView,
        queues: RequestQueues,
        costs: CostModel,
        limits: SchedulerLimits,
        stats: dict[str, ModelStats],
        sizes: dict[str, int],
        load_remaining: Mapping[str, float],
    ) -> None:
        self.now = now
        self.view = view
        self.queues = queues
        self.costs = costs
        self.limits = limits
        self.stats = stats
        self.sizes = sizes
        self.load_remaining = load_remaining  # predicted seconds left of loads our prefetches started
        self.expired: list[Request] = []  # taken out of the queues during this call
        self.resident = frozenset(view.resident)
        self.loading = frozenset(view.loading)
        self.host = frozenset(view.host)
        self.device_free = view.device_free
        # Loads share one channel: a new load starts after the ones in flight (unknown ones count in full).
        self.channel_wait = sum(
            load_remaining[m] if m in load_remaining else costs.load_seconds(self.nbytes(m))
            for m in self.loading
        )

    def nbytes(self, model: str) -> int:
        n = self.sizes[model] = self.view.model_bytes(model)
        return n

    def is_resident(self, model: str) -> bool:
        return model in self.resident

    def is_loading(self, model: str) -> bool:
        return model in self.loading

    def source(self, model: str) -> Tier:
        if model in self.resident:
            return Tier.DEVICE
        return Tier.HOST if model in self.host or model in self.loading else Tier.DISK

    def missing_bytes(self, model: str) -> int:
        """Device bytes that must still be found for ``model`` (0 if resident or already loading)."""
        return 0 if model in self.resident or model in self.loading else self.nbytes(model)

    def load_seconds(self, model: str) -> float:
        """Predicted seconds until ``model`` is resident if its load started (or continued) now."""
        if model in self.resident:
            return 0.0
        if model in self.load_remaining:
            return self.load_remaining[model]
        if model in self.loading:  # started by the engine itself: assume it just began
            return self.costs.load_seconds(self.nbytes(model))
        return self.channel_wait + self.costs.load_seconds(self.nbytes(model), self.source(model))

    def exec_seconds(self, model: str, tokens: int) -> float:
        return self.costs.exec_seconds(model, tokens, self.sizes.get(model, 0))

    def step_seconds(self, model: str, tokens: int) -> float:
        """Predicted wall time of running ``tokens`` on ``model`` now, its load included."""
        return self.costs.step_seconds(self.load_seconds(model), self.exec_seconds(model, tokens))

    def rate(self, model: str) -> float:
        stats = self.stats.get(model)
        return stats.rate(self.now, self.limits.rate_window_s) if stats else 0.0

    def last_used(self, model: str) -> float:
        stats = self.stats.get(model)
        return stats.last_used if stats else -math.inf

    def expire(self, req: Request) -> None:
        """Take ``req`` out of its queue; the step will fail it as a timeout."""
        self.queues.remove(req)
        self.expired.append(req)

    def doomed(self, req: Request) -> bool:
        """True when ``req`` would miss its deadline even if it ran alone right now."""
        return self.now + self.step_seconds(req.model, req.tokens) > req.deadline


def take(
    ctx: Context,
    model: str,
    reqs: Iterable[Request],
    batch: list[Request],
    *,
    predictive: bool,
    max_seconds: float = math.inf,
) -> None:
    """Append requests of ``model`` from ``reqs`` (in their order) to ``batch`` while the batch limits hold.

    With ``predictive``, a request joins only if the batch is still predicted to finish before every member's
    deadline; a request that cannot finish in time even alone is expired. Once ``batch`` is non-empty, no
    request joins that would make the step end later than ``max_seconds`` from now.
    """
    lim = ctx.limits
    tokens = sum(r.tokens for r in batch)
    bound = min((r.deadline for r in batch), default=math.inf)
    load = ctx.load_seconds(model)
    a, b = ctx.costs.exec_params(model, ctx.sizes.get(model, 0))
    if predictive:  # joining is judged on a pessimistic estimate, expiry on the plain one
        margin = ctx.costs.exec_margin(model)
        a, b = a * margin, b * margin
    step = ctx.costs.step_seconds
    doomed: list[Request] = []
    scanned = 0
    for r in reqs:
        if len(batch) >= lim.max_batch_requests or scanned >= 4 * lim.max_batch_requests:
            break
        scanned += 1
        t = tokens + r.tokens
        if batch and t > lim.max_batch_tokens:
            continue
        finish = ctx.now + step(load, a + b * t) if (predictive or max_seconds < math.inf) else 0.0
        if predictive and finish > min(bound, r.deadline):
            if ctx.doomed(r):
                doomed.append(r)
            continue
        if batch and finish > ctx.now + max_seconds:
            break
        batch.append(r)
        tokens = t
        bound = min(bound, r.deadline)
    for r in doomed:
        ctx.expire(r)


class Policy:
    """A scheduling policy. Subclasses override ``plans`` and may override the other hooks."""

    name: ClassVar[str] = "policy"
    predictive_expiry: bool = False  # expire requests predicted to miss, not only those already late

    def __init__(self, predictive_expiry: bool | None = None) -> None:
        if predictive_expiry is not None:
            self.predictive_expiry = predictive_expiry

    def expire(self, ctx: Context) -> None:
        """Expire queued requests whose deadline has passed; with ``predictive_expiry``, also each queue's
        leading requests that would miss their deadline even if run alone now."""
        queues = ctx.queues
        for cls in RequestClass:
            while (r := queues.earliest(cls)) is not None and r.deadline <= ctx.now:
                ctx.expire(r)
        if not self.predictive_expiry:
            return
        for cls in RequestClass:
            for m in queues.models(cls):
                q = queues.queue(m, cls)
                while q and ctx.doomed(q[0]):
                    ctx.expire(q[0])

    def plans(self, ctx: Context) -> Iterator[Plan]:
        """Candidate steps, best first. The scheduler runs the first one whose bytes it can fit."""
        raise NotImplementedError

    def eviction_order(self, ctx: Context, candidates: list[str]) -> list[str]:
        """``candidates`` (resident, idle models) ordered so the first should be evicted first. LRU."""
        return sorted(candidates, key=ctx.last_used)

    def prefetch(self, ctx: Context, model: str, free: int) -> list[str]:
        """Models worth loading in the background while ``model`` runs, best first (``free`` device bytes
        remain after the step's own load). None by default: the baselines load on demand."""
        return []

    def on_step(self, ctx: Context, step: Step) -> None:
        """Called with every step ``schedule`` hands out (for policies with memory between steps)."""


def queued(ctx: Context, model: str) -> list[Request]:
    """Every queued request of ``model``, both classes."""
    return [*ctx.queues.queue(model, REALTIME), *ctx.queues.queue(model, BATCH)]


def kind_of(batch: list[Request]) -> StepKind:
    return StepKind.REALTIME if any(r.cls is REALTIME for r in batch) else StepKind.BATCH
