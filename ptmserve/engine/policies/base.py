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
        typical_timeout: Mapping[RequestClass, float] | None = None,
    ) -> None:
        self.now = now
        self.view = view
        self.queues = queues
        self.costs = costs
        self.limits = limits
        self.stats = stats
        self.sizes = sizes
        self.load_remaining = load_remaining  # predicted seconds left of loads our prefetches started
        self.typical_timeout = typical_timeout or {}  # recent mean of (deadline - arrival) per class
        self.expired: list[Request] = []  # taken out of the queues during this call
        self._nbytes: dict[str, int] = {}
        self.resident = frozenset(view.resident)
        self.loading = frozenset(view.loading)
        self.host = view.host  # only asked "in"
        self.device_free = view.device_free
        # Loads share one channel: a new load starts after the ones in flight (unknown ones count in full).
        self.channel_wait = sum(
            load_remaining[m] if m in load_remaining else costs.load_seconds(self.nbytes(m))
            for m in self.loading
        )

    def nbytes(self, model: str) -> int:
        """Device bytes of ``model`` (asked of the view once per call of ``schedule``)."""
        n = self._nbytes.get(model)
        if n is None:
            n = self._nbytes[model] = self.sizes[model] = self.view.model_bytes(model)
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

    def load_seconds(self, model: str, delay: float = 0.0) -> float:
        """Predicted seconds until ``model`` is resident, counted from ``delay`` seconds from now, if it is
        asked for then: what is left of its load in flight, or a new load behind the loads in flight."""
        if model in self.resident:
            return 0.0
        if model in self.load_remaining:
            return max(self.load_remaining[model] - delay, 0.0)
        if model in self.loading:  # started by the engine itself: assume it just began
            return max(self.costs.load_seconds(self.nbytes(model)) - delay, 0.0)
        wait = max(self.channel_wait - delay, 0.0)
        return wait + self.costs.load_seconds(self.nbytes(model), self.source(model))

    def exec_seconds(self, model: str, tokens: int) -> float:
        return self.costs.exec_seconds(model, tokens, self.nbytes(model))

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

    def horizon(self) -> float:
        """Slack beyond which no queued request can be doomed: the longest predicted load (from disk,
        behind the loads in flight) plus the longest run of the largest request ever queued."""
        largest = max(self.sizes.values(), default=0)
        load = self.costs.load_seconds(largest, Tier.DISK)
        return self.channel_wait + load + self.costs.max_exec_seconds(self.queues.max_tokens, largest)

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
    deadline, with the model's error margin (the first request of a batch: half of it, so that it gets its
    chance alone); a request that cannot finish in time even alone is expired. Once ``batch`` is non-empty,
    no request joins that would make the step end later than ``max_seconds`` from now.
    """
    lim = ctx.limits
    tokens = sum(r.tokens for r in batch)
    bound = min((r.deadline for r in batch), default=math.inf)
    load = ctx.load_seconds(model)
    a, b = ctx.costs.exec_params(model, ctx.nbytes(model))
    step = ctx.costs.step_seconds
    doomed: list[Request] = []
    it = iter(reqs)
    if predictive:  # joining is judged on pessimistic estimates, expiry on the plain one
        margin = ctx.costs.exec_margin(model)
        if not batch:  # the first request of a batch gets its chance alone with half the margin
            first = _first_alone(ctx, it, load, a * (1 + margin) / 2, b * (1 + margin) / 2, doomed)
            if first is not None:
                batch.append(first)
                tokens, bound = first.tokens, first.deadline
        a, b = a * margin, b * margin
    scanned = 0
    for r in it:
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


def _first_alone(
    ctx: Context, it: Iterator[Request], load: float, a: float, b: float, doomed: list[Request]
) -> Request | None:
    """The first request of ``it`` predicted (exec ``a + b * tokens``) to finish alone by its deadline;
    the doomed ones met on the way go to ``doomed``."""
    for scanned, r in enumerate(it):
        if ctx.now + ctx.costs.step_seconds(load, a + b * r.tokens) <= r.deadline:
            return r
        if ctx.doomed(r):
            doomed.append(r)
        if scanned >= 4 * ctx.limits.max_batch_requests:
            break
    return None


def servable(ctx: Context, model: str, reqs: Iterable[Request], delay: float = 0.0) -> int:
    """How many of ``reqs`` (in their order) one batch of ``model`` starting ``delay`` seconds from now
    would serve within their deadlines, under ``take``'s rules (without taking them)."""
    lim = ctx.limits
    margin = ctx.costs.exec_margin(model)
    a, b = ctx.costs.exec_params(model, ctx.nbytes(model))
    a, b = a * margin, b * margin
    load = ctx.load_seconds(model, delay)
    start = ctx.now + delay
    step = ctx.costs.step_seconds
    count, tokens, bound = 0, 0, math.inf
    for scanned, r in enumerate(reqs):
        if count >= lim.max_batch_requests or scanned >= 4 * lim.max_batch_requests:
            break
        t = tokens + r.tokens
        if count and t > lim.max_batch_tokens:
            continue
        if start + step(load, a + b * t) <= min(bound, r.deadline):
            count, tokens, bound = count + 1, t, min(bound, r.deadline)
    return count


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
        horizon = ctx.now + ctx.horizon()
        for cls in RequestClass:
            for q in queues.nonempty(cls):
                while q and q[0].deadline < horizon and ctx.doomed(q[0]):
                    ctx.expire(q[0])

    def plans(self, ctx: Context) -> Iterator[Plan]:
        """Candidate steps, best first. The scheduler runs the first one whose bytes it can fit."""
        raise NotImplementedError

    def eviction_order(self, ctx: Context, candidates: list[str]) -> list[str]:
        """``candidates`` (resident, idle models) ordered so the first should be evicted first. LRU."""
        return sorted(candidates, key=ctx.last_used)

    def prefetch_victims(self, ctx: Context, candidates: list[str], target: str) -> list[str]:
        """Which of ``candidates`` may be evicted to prefetch ``target``, the first to evict first."""
        return self.eviction_order(ctx, candidates)

    def prefetch(self, ctx: Context, model: str, free: int, seconds: float) -> Iterable[str]:
        """Models worth loading in the background while ``model`` runs for ``seconds``, best first
        (``free`` device bytes remain after the step's own load); the scheduler takes as many as fit.
        None by default: the baselines load on demand."""
        return ()

    def wake_at(self, queues: RequestQueues) -> float | None:
        """The earliest time the policy may run queued work it holds back now (None: it holds none back)."""
        return None

    def on_step(self, ctx: Context, step: Step) -> None:
        """Called with every step ``schedule`` hands out (for policies with memory between steps)."""


def kind_of(batch: list[Request]) -> StepKind:
    return StepKind.REALTIME if any(r.cls is REALTIME for r in batch) else StepKind.BATCH
