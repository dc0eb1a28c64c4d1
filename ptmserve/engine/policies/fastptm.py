"""``fastptm``: real-time first, switch-aware, deadline-predictive, with prefetch and reuse-based eviction.

How one step is chosen (docs/scheduling.md explains why):

1. Expire every queued request that cannot meet its deadline even if it ran alone now (its load included).
2. If batch-class work is *owed* (it waited ``batch_max_wait_s``, or its deadline is ``batch_urgent_slack_s``
   away) and either no real-time work waits or the last ``rt_streak`` steps were real-time: run the owed
   request's model with batch-class work (``FORCED``).
3. Else, if real-time work waits: score the most urgent ``candidates`` models plus every resident one.
   A candidate's batch is its real-time queue in deadline order, as much as fits the limits and every
   member's deadline. Score = (requests it serves - ``lost_weight`` * real-time requests of the other urgent
   models that running it first would doom) / predicted seconds, load included. A resident model's step is
   short, so resident work wins unless a cold model's requests would otherwise be lost: switches happen
   late and carry many requests. When no other model has real-time work, batch-class requests fill the
   step up to ``batch_step_s``.
4. Else run batch-class work, capped at ``batch_step_s`` per step: a resident model with the deepest queue,
   else the cold model with the deepest queue (most requests per switch).
5. While a step runs, prefetch the cold model most likely to run next (the most urgent cold real-time
   model; else the deepest cold batch queue or the busiest idle model if memory is free).
6. Evict by expected reuse: models with queued real-time work last, then by recent arrival rate times
   reload seconds per byte, then least recently used.

Bound on batch starvation: an owed batch request waits at most ``rt_streak`` real-time steps, plus one
step per owed batch request ahead of it (earlier deadline, or earlier arrival once waiting is what made it
owed). A real-time request waits for at most one step of batch-class work, of at most ``batch_step_s``
beyond that step's first request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ptmserve.engine.costs import Tier
from ptmserve.engine.policies.base import BATCH, REALTIME, Context, Plan, Policy, StepKind, take
from ptmserve.engine.requests import Request

if TYPE_CHECKING:
    from ptmserve.engine.scheduler import Step


@dataclass(frozen=True, slots=True)
class FastPtmOptions:
    batch_step_s: float = 0.1  # a step carrying batch-class work ends within this (beyond its first request)
    rt_streak: int = 4  # real-time steps in a row after which owed batch work gets the next step
    batch_max_wait_s: float = 10.0  # batch work queued this long is owed a step
    batch_urgent_slack_s: float = 1.0  # batch work this close to its deadline is owed a step
    candidates: int = 8  # real-time models scored per step: this many most urgent, plus the resident ones
    lost_weight: float = 1.0  # weight of the real-time requests another choice would doom

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
        take(ctx, model, rest, batch, predictive=True, max_seconds=self.options.batch_step_s)
        return Plan(model, batch, kind)

    def _rank_realtime(self, ctx: Context) -> Iterator[Plan]:
        q, o = ctx.queues, self.options
        heads = sorted((q.queue(m, REALTIME)[0].deadline, m) for m in q.models(REALTIME))
        urgent = [m for _, m in heads[: o.candidates]]
        near = [m for _, m in heads[o.candidates :] if ctx.is_resident(m) or ctx.is_loading(m)]
        alone = len(heads) == 1
        scored: list[tuple[float, int, float, str, list[Request]]] = []
        for m in urgent + near:
            rt = q.queue(m, REALTIME)
            if not rt:
                continue
            head = rt[0].deadline
            batch: list[Request] = []
            take(ctx, m, rt, batch, predictive=True)
            if not batch:
                continue
            if alone:  # batch-class work fills the step only when no other model's real-time work waits
                take(ctx, m, q.queue(m, BATCH), batch, predictive=True, max_seconds=o.batch_step_s)
            seconds = max(ctx.step_seconds(m, sum(r.tokens for r in batch)), 1e-9)
            served = sum(1 for r in batch if r.cls is REALTIME)
            lost = self._lost(ctx, m, seconds, urgent)
            score = (served - o.lost_weight * lost) / seconds
            scored.append((-score, 0 if ctx.is_resident(m) else 1, head, m, batch))
        scored.sort(key=lambda s: s[:4])
        for _, _, _, m, batch in scored:
            yield Plan(m, batch, StepKind.REALTIME)

    def _lost(self, ctx: Context, model: str, seconds: float, urgent: list[str]) -> int:
        """Real-time requests of the other urgent models that can still be served now but would be doomed
        if ``model`` ran first for ``seconds``."""
        lost = 0
        for x in urgent:
            rt = ctx.queues.queue(x, REALTIME)
            if x == model or not rt:
                continue
            alone = ctx.step_seconds(x, rt[0].tokens)
            lo = ctx.now + alone
            lost += rt.count_deadlines_before(lo + seconds) - rt.count_deadlines_before(lo)
        return lost

    def _rank_batch(self, ctx: Context) -> list[str]:
        q = ctx.queues
        models = q.models(BATCH)
        warm = [m for m in models if ctx.is_resident(m) or ctx.is_loading(m)]
        cold = [m for m in models if not (ctx.is_resident(m) or ctx.is_loading(m))]
        warm.sort(key=lambda m: -len(q.queue(m, BATCH)))
        cold.sort(key=lambda m: -len(q.queue(m, BATCH)))
        return warm + cold

    def prefetch(self, ctx: Context, model: str, free: int) -> list[str]:
        if ctx.loading:  # one load at a time: a second would only slow the first
            return []
        q = ctx.queues

        def cold(m: str) -> bool:
            return m != model and not ctx.is_resident(m) and not ctx.is_loading(m)

        rt = sorted((q.queue(m, REALTIME)[0].deadline, m) for m in q.models(REALTIME) if cold(m))
        if rt:
            return [m for _, m in rt[:2]]
        batch = sorted((m for m in q.models(BATCH) if cold(m)), key=lambda m: -len(q.queue(m, BATCH)))
        if batch and ctx.nbytes(batch[0]) <= free:
            return batch[:1]
        idle = [m for m in ctx.stats if cold(m) and ctx.nbytes(m) <= free and ctx.rate(m) > 0]
        return sorted(idle, key=ctx.rate, reverse=True)[:1]

    def eviction_order(self, ctx: Context, candidates: list[str]) -> list[str]:
        def value(m: str) -> tuple[bool, float, float]:
            nbytes = max(ctx.nbytes(m), 1)
            reuse = ctx.rate(m) * ctx.costs.load_seconds(nbytes, Tier.HOST) / nbytes
            return (ctx.queues.has(m, REALTIME), reuse, ctx.last_used(m))

        return sorted(candidates, key=value)

    def on_step(self, ctx: Context, step: Step) -> None:
        if step.kind is StepKind.REALTIME:
            self._streak += 1
        elif step.kind in (StepKind.BATCH, StepKind.FORCED):
            self._streak = 0
