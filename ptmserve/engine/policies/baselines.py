"""The baselines, modelled on how the peers behave (Ray Serve model multiplexing, Triton with on-demand
loading): per-model dynamic batching of whatever is queued, loads on demand, LRU eviction, no prefetch.
``fifo-naive`` is FastPTM's own baseline, one step further back: one request per step, in arrival order.

They obey the same batch limits and budgets as ``fastptm`` and use the same loader. Their timeout semantics
are the peers' too (Triton's queue policy): a request whose deadline has passed when it would be dequeued is
rejected as a timeout, but nothing predicts whether a dequeued request will finish in time, so a request may
run and finish late (the engine then fails it as a timeout). ``predictive_expiry=True`` gives them our
predictive expiry instead, to separate what expiry alone buys from what ordering buys.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from ptmserve.engine.policies.base import Context, Plan, Policy, kind_of, take
from ptmserve.engine.requests import Request, RequestClass


class _OrderedPolicy(Policy):
    """Pick the model of the first request in one global order; batch that model's requests in that order."""

    order = "arrival"  # or "deadline"

    def _head(self, ctx: Context) -> Request | None:
        raise NotImplementedError

    def _key(self, ctx: Context) -> Callable[[Request], tuple[float, int]]:
        raise NotImplementedError

    def plans(self, ctx: Context) -> Iterator[Plan]:
        head = self._head(ctx)
        if head is None:
            return
        yield self._plan(ctx, head.model)
        # Only reached when the head model cannot be given room (every other resident model is busy).
        key = self._key(ctx)
        firsts: dict[str, tuple[float, int]] = {}
        for cls in RequestClass:
            for m in ctx.queues.models(cls):
                if m != head.model:
                    k = key(ctx.queues.queue(m, cls)[0])
                    firsts[m] = min(firsts.get(m, k), k)
        for m in sorted(firsts, key=firsts.__getitem__):
            yield self._plan(ctx, m)

    def _plan(self, ctx: Context, model: str) -> Plan:
        batch: list[Request] = []
        take(ctx, model, ctx.queues.in_order(model, self.order), batch, predictive=self.predictive_expiry)
        return Plan(model, batch, kind_of(batch))


class FifoLru(_OrderedPolicy):
    """Arrival order across models and classes; the oldest request's model runs with everything queued
    for it (arrival order, up to the limits)."""

    name = "fifo-lru"
    order = "arrival"

    def _head(self, ctx: Context) -> Request | None:
        return ctx.queues.oldest()

    def _key(self, ctx: Context) -> Callable[[Request], tuple[float, int]]:
        seq = ctx.queues.seq
        return lambda r: (r.arrival, seq(r))


class EdfLru(_OrderedPolicy):
    """Earliest deadline first across models and classes, blind to what a switch costs."""

    name = "edf-lru"
    order = "deadline"

    def _head(self, ctx: Context) -> Request | None:
        return ctx.queues.earliest()

    def _key(self, ctx: Context) -> Callable[[Request], tuple[float, int]]:
        seq = ctx.queues.seq
        return lambda r: (r.deadline, seq(r))


class FifoNaive(FifoLru):
    """FastPTM's baseline: requests one at a time, strictly in arrival order, each loading its model on
    demand (LRU eviction). It batches nothing, so every change of model between two consecutive requests is
    a switch."""

    name = "fifo-naive"

    def _plan(self, ctx: Context, model: str) -> Plan:
        batch: list[Request] = []
        first = itertools.islice(ctx.queues.in_order(model, self.order), 1)  # the oldest request's model
        take(ctx, model, first, batch, predictive=self.predictive_expiry)  # comes first: it is the oldest
        return Plan(model, batch, kind_of(batch))
