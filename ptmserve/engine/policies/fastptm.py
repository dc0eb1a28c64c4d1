"""``fastptm``: real-time first, switch-aware, deadline-predictive, with prefetch and reuse-based eviction.

One step, as docs/scheduling.md explains:

1. Expire what cannot meet its deadline even if it ran alone now, its load included (``Policy.expire``).
2. Batch-class work that is *owed* (queued ``batch_max_wait_s``, or within ``batch_urgent_slack_s`` of its
   deadline) runs first if no real-time work waits or the last ``rt_streak`` steps were real-time (FORCED).
3. Else real-time work: score the ``candidates`` most urgent models plus every resident one. A candidate's
   batch is its real-time queue in deadline order, as much as the limits and every member's deadline allow;
   score = (requests served - ``lost_weight`` * real-time requests of other urgent models it would doom)
   / predicted seconds, load included. Resident work is short and wins until a cold model's requests would
   be lost: switches come late and carry everything queued. Batch-class requests of the same model fill
   the step while that dooms nobody. When the best-scored step would doom another model's requests and
   that model's step dooms nobody, it runs first (a rate cannot see that running it first loses nothing).
4. Else batch-class work, the resident model with the deepest queue first, then the deepest cold queue.
   Once real-time traffic exists, such a step is capped at ``min(batch_step_s, batch_step_share * the
   real-time timeout)``.
5. Prefetch, just in time, the cold model whose real-time work must start within ``prefetch_steps`` steps
   (evicting only models without queued real-time work); batch or rate-based guesses only fill free memory.
6. Evict by expected reuse: queued real-time work last, then arrival rate * reload seconds / bytes, then LRU.

Bounds: an owed batch request runs within ``rt_streak`` real-time steps plus one step per owed batch
request ahead of it; a real-time request waits for at most one step carrying batch-class work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ptmserve.engine.costs import Tier
from ptmserve.engine.policies.base import BATCH, REALTIME, Context, Plan, Policy, StepKind, servable, take
from ptmserve.engine.requests import Request, RequestQueues

if TYPE_CHECKING:
    from ptmserve.engine.scheduler import Step


@dataclass(frozen=True, slots=True)
class FastPtmOptions:
    batch_step_s: float = 0.1  # a step carrying batch-class work ends within this (beyond its first request)
    batch_step_share: float = 0.2  # ... and within this share of the usual real-time timeout
    rt_streak: int = 4  # real-time steps in a row after which owed batch work gets the next step
    batch_max_wait_s: float = 10.0  # batch work queued this long is owed a step
    batch_urgent_slack_s: float = 1.0  # batch work this close to its deadline is owed a step
    candidates: int = 8  # real-time models scored per step: this many most urgent, plus the resident ones
    lost_weight: float = 1.0  # weight of the real-time requests another choice would doom
    batch_switch: int = 8  # batch requests a cold model needs queued to evict for it before they are owed
    prefetch_steps: float = 4.0  # prefetch a cold model once its real-time work must start within this
    # many steps of the current one's length

    def __post_init__(self) -> None:
        if self.batch_step_s <= 0 or self.rt_streak < 0 or self.candidates < 1:
            raise ValueError(f"invalid fastptm options: {self}")


class FastPtm(Policy):
    name = "fastptm"
    predictive_expiry = True

    def __init__(self, options: FastPtmOptions | None = None, predictive_expiry: bool | None = None) -> None:
        super().__init__(predictive_expiry)
        self.options = options or FastPtmOptions()
        self._streak = 0  # real-time steps since the last step that served batch-class work

    def plans(self, ctx: Context) -> Iterator[Plan]:
        q = ctx.queues
        owed = self._owed(ctx)
        rt_waiting = bool(q.models(REALTIME))
        if owed is not None and (not rt_waiting or self._streak >= self.options.rt_streak):
            yield self._batch_plan(ctx, owed.model, StepKind.FORCED, first=owed)
        if rt_waiting:
            yield from self._rank_realtime(ctx)
        for model in self._rank_batch(ctx):
            yield self._batch_plan(ctx, model, StepKind.BATCH)

    def _owed(self, ctx: Context) -> Request | None:
        q, o = ctx.queues, self.options
        urgent = q.earliest(BATCH)
        if urgent is not None and urgent.deadline - ctx.now <= o.batch_urgent_slack_s:
            return urgent
        oldest = q.oldest(BATCH)
        if oldest is not None and ctx.now - oldest.arrival >= o.batch_max_wait_s:
            return oldest
        return None

    def _batch_plan(self, ctx: Context, model: str, kind: StepKind, first: Request | None = None) -> Plan:
        batch: list[Request] = []
        if first is not None:
            if ctx.doomed(first):
                ctx.expire(first)
            else:
                batch.append(first)
        rest = (r for r in ctx.queues.queue(model, BATCH) if r is not first)
        cap = self._batch_cap(ctx)
        if kind is StepKind.FORCED:  # real-time work waits: use only half of its slack
            q = ctx.queues
            for m in q.models(REALTIME):
                head = q.queue(m, REALTIME)[0]
                cap = min(cap, (head.deadline - ctx.now - ctx.step_seconds(m, head.tokens)) / 2)
            cap = max(cap, self._batch_cap(ctx) / 2)
        take(ctx, model, rest, batch, predictive=True, max_seconds=cap)
        return Plan(model, batch, kind)

    def _batch_cap(self, ctx: Context) -> float:
        """How long a step carrying batch-class work may take: ``batch_step_s``, and no more than
        ``batch_step_share`` of the usual real-time timeout (a real-time request may arrive meanwhile).
        Unlimited while no real-time request was ever seen: there is no one to protect."""
        o = self.options
        rt_timeout = ctx.typical_timeout.get(REALTIME)
        return min(o.batch_step_s, o.batch_step_share * rt_timeout) if rt_timeout else math.inf

    def _rank_realtime(self, ctx: Context) -> Iterator[Plan]:
        q, o = ctx.queues, self.options
        heads = sorted((q.queue(m, REALTIME)[0].deadline, m) for m in q.models(REALTIME))
        urgent = [m for _, m in heads[: o.candidates]]
        near = [m for _, m in heads[o.candidates :] if ctx.is_resident(m) or ctx.is_loading(m)]
        alone = len(heads) == 1
        cap = self._batch_cap(ctx)
        now_ok: dict[str, int] = {}
        scored: list[tuple[float, int, float, str, list[Request]]] = []
        watched = urgent + near  # whose requests a choice may doom
        dooms: dict[str, set[str]] = {}  # candidate -> the models whose requests running it first dooms
        for m in watched:
            rt = q.queue(m, REALTIME)
            if not rt:
                continue
            head = rt[0].deadline
            batch: list[Request] = []
            take(ctx, m, rt, batch, predictive=True)
            if not batch:
                continue
            seconds = max(ctx.step_seconds(m, sum(r.tokens for r in batch)), 1e-9)
            dooms[m] = set()
            lost = self._lost(ctx, m, seconds, watched, now_ok, dooms[m])
            if q.has(m, BATCH):  # batch-class work fills the step while that dooms no real-time request
                filled = list(batch)
                take(ctx, m, q.queue(m, BATCH), filled, predictive=True, max_seconds=max(cap, seconds))
                longer = max(ctx.step_seconds(m, sum(r.tokens for r in filled)), 1e-9)
                if len(filled) > len(batch) and (
                    alone or self._lost(ctx, m, longer, watched, now_ok) <= lost
                ):
                    batch, seconds = filled, longer
            served = sum(1 for r in batch if r.cls is REALTIME)
            score = (served - o.lost_weight * lost) / seconds
            scored.append((-score, 0 if ctx.is_resident(m) else 1, head, m, batch))
        scored.sort(key=lambda s: s[:4])
        if scored and dooms[scored[0][3]]:
            # The best rate dooms another model's requests: if one of those models can run first without
            # dooming anyone (the best's requests included), it goes first. Both steps then serve what
            # the best order would, and the doomed requests too; the rate alone cannot see that.
            rescue = [s for s in scored[1:] if s[3] in dooms[scored[0][3]] and not dooms[s[3]]]
            if rescue:
                first = min(rescue, key=lambda s: s[2])
                scored.remove(first)
                scored.insert(0, first)
        for _, _, _, m, batch in scored:
            yield Plan(m, batch, StepKind.REALTIME)

    def _lost(
        self,
        ctx: Context,
        model: str,
        seconds: float,
        urgent: list[str],
        now_ok: dict[str, int],
        doomed: set[str] | None = None,
    ) -> int:
        """Real-time requests of the other urgent models that one batch could serve now but not after
        ``model`` ran first for ``seconds``; the models they belong to are added to ``doomed``."""
        lost = 0
        for x in urgent:
            rt = ctx.queues.queue(x, REALTIME)
            if x == model or not rt:
                continue
            if x not in now_ok:
                now_ok[x] = servable(ctx, x, rt)
            drop = now_ok[x] - servable(ctx, x, rt, delay=seconds)
            if drop > 0 and doomed is not None:
                doomed.add(x)
            lost += drop
        return lost

    def _rank_batch(self, ctx: Context) -> list[str]:
        """Models to run batch-class work on: resident ones by queue depth, then cold ones that fit in free
        memory or whose queue is deep enough to be worth evicting for (the others wait until their work is
        owed, gathering more)."""
        q = ctx.queues
        models = q.models(BATCH)
        warm = [m for m in models if ctx.is_resident(m) or ctx.is_loading(m)]
        cold = [
            m
            for m in models
            if m not in warm
            and (len(q.queue(m, BATCH)) >= self.options.batch_switch or ctx.nbytes(m) <= ctx.device_free)
        ]
        warm.sort(key=lambda m: -len(q.queue(m, BATCH)))
        cold.sort(key=lambda m: -len(q.queue(m, BATCH)))
        return warm + cold

    def wake_at(self, queues: RequestQueues) -> float | None:
        oldest, urgent = queues.oldest(BATCH), queues.earliest(BATCH)
        if oldest is None or urgent is None:
            return None
        o = self.options
        return min(oldest.arrival + o.batch_max_wait_s, urgent.deadline - o.batch_urgent_slack_s)

    def prefetch(self, ctx: Context, model: str, free: int, seconds: float) -> Iterator[str]:
        if ctx.loading:  # one load at a time: a second would only slow the first
            return
        q = ctx.queues

        def cold(m: str) -> bool:
            return m != model and m not in ctx.resident and m not in ctx.loading

        # Just in time: a cold model whose real-time work must start within about two steps from now.
        # Loading earlier would only end its wait for more requests to share the switch.
        rt = []
        for m in q.models(REALTIME):
            if cold(m):
                head = q.queue(m, REALTIME)[0]
                slack = head.deadline - ctx.now - ctx.step_seconds(m, head.tokens)
                if slack <= self.options.prefetch_steps * seconds:
                    rt.append((slack, m))
        yield from (m for _, m in sorted(rt)[:2])
        if free <= 0:  # other prefetches only fill free bytes (see prefetch_victims)
            return
        batch = [m for m in q.models(BATCH) if cold(m)]
        if batch:
            yield max(batch, key=lambda m: len(q.queue(m, BATCH)))
        idle = [m for m in ctx.stats if cold(m) and not q.has(m)]
        if idle:
            yield max(idle, key=ctx.rate)

    def prefetch_victims(self, ctx: Context, candidates: list[str], target: str) -> list[str]:
        """Only a prefetch for queued real-time work evicts, and never a model with queued real-time work."""
        q = ctx.queues
        if not q.has(target, REALTIME):  # batch work can wait for its own step; a guess only fills free bytes
            return []
        return self.eviction_order(ctx, [m for m in candidates if not q.has(m, REALTIME)])

    def _reuse(self, ctx: Context, model: str) -> float:
        """Expected reload seconds saved per byte kept: arrival rate * reload seconds / bytes."""
        nbytes = max(ctx.nbytes(model), 1)
        return ctx.rate(model) * ctx.costs.load_seconds(nbytes, Tier.HOST) / nbytes

    def eviction_order(self, ctx: Context, candidates: list[str]) -> list[str]:
        q = ctx.queues
        return sorted(candidates, key=lambda m: (q.has(m, REALTIME), self._reuse(ctx, m), ctx.last_used(m)))

    def on_step(self, ctx: Context, step: Step) -> None:
        if step.kind is StepKind.REALTIME:
            self._streak += 1
        elif step.kind in (StepKind.BATCH, StepKind.FORCED):
            self._streak = 0
