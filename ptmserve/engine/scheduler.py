"""The online multi-model scheduler: which model runs next, with which batch, and what moves in memory.

Contract with the engine (the scheduler is not thread-safe: the engine calls it under one lock, and never
holds that lock while a step computes, so admission, cancellation and expiry happen while a step runs):

1. ``submit(req)`` whenever a request arrives: it raises ``Overloaded`` or ``DeadlineExceeded`` at once.
2. When the worker is free: ``step = schedule(view)``.
   - Fail every request of ``step.expired`` as a timeout (``DeadlineExceeded``); never run them.
   - Evict ``step.evict`` from the device, in order; then, if ``step.load_needed``, load ``step.model``
     (or wait for its load already in flight); start loading ``step.prefetch`` in the background, behind
     that load (the scheduler predicts loads as sharing one channel, one after another).
   - Run the inputs ``step.spans[r.id]`` of each request ``r`` of ``step.batch`` on ``step.model`` as one
     batch. A request larger than the batch token limit runs a part per step and goes back to its queue
     between parts, so that other work (real-time work of other models) runs in between.
   - Call ``finished = on_step_done(step, ...)`` with what it measured, before the next ``schedule``; it
     returns the requests whose last inputs this step computed. Deliver those; a result ready after its
     request's deadline is failed as a timeout, not delivered.
   - A step with ``model`` None (kind IDLE) has nothing to run now: fail its ``expired``, then wait for the
     next ``submit``, the end of a load, or ``wake_at()``, whichever comes first; it needs no report.
3. When a background load (prefetch) finishes or fails: ``on_load_done(model, ...)``.
4. ``cancel(id)`` when a client goes away: a queued request leaves its queue at once.
5. ``expire(now)`` from a timer at ``next_deadline()``: queued requests whose deadline passed leave at
   once, whatever is running.

Requests move WAITING -> RUNNING (``running``: scheduled at least once, until their last part is done)
-> FINISHED, or end CANCELLED, TIMED_OUT or FAILED (``RequestStatus``).

Text generation (continuous batching). A generation request (``Request.generates``) waits in its queue
like any other until it starts; its deadline is the deadline of its first step (the first token's).
Once started it is ``active``: it leaves the queues (no deadline expires it any more) and every step of
its model carries it, until the runner reports it finished. A step of a decoder model holds, in order,
its active sequences with one token to compute (decodes), those still prefilling a long prompt, then
waiting requests by deadline, within ``max_batch_tokens`` and ``max_batch_requests``: a long prompt
is prefilled in chunks in the room the decodes leave. ``on_step_done`` takes the runner's ``progress``:
per request the tokens it must compute before its next one (0: finished); a request of the step that is
missing there could not start (no free KV cache blocks) and goes back to its queue.

One decoder model at a time holds the KV cache: while one has active sequences, the requests of any
other decoder model wait (and the holder starts no new ones, so that it drains), and the holder is never
evicted. Other models' steps (encoders) are not held back: with active sequences, at most every other
step is another model's, so that neither starves.

Everything the scheduler decides about device memory goes through ``Step.evict`` and ``Step.prefetch``;
``Step.eviction_order`` ranks every model holding weights for the evictions the weight manager must make
on its own while the step runs (the host tier, or room for a load the step could not foresee), so the
manager follows the scheduler's order instead of one of its own: one authority over what leaves memory.

Pure Python: no torch, no threads, an injected clock (seconds).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ptmserve.engine.costs import CostModel, Tier
from ptmserve.engine.policies import Context, ModelStats, Plan, Policy, StepKind, make_policy
from ptmserve.engine.requests import Request, RequestClass, RequestQueues, RequestStatus
from ptmserve.errors import DeadlineExceeded, InvalidConfig, InvalidInput

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "SchedulerLimits", "Step", "StepKind", "TierSnapshot", "TierView"]


class TierView(Protocol):
    """What the scheduler needs to know about the weight tiers, at the moment ``schedule`` is called.

    The engine's weight manager implements it (``TierSnapshot`` is a ready-made implementation).
    """

    @property
    def resident(self) -> Collection[str]:
        """Models whose weights are on the device and ready to run."""

    @property
    def loading(self) -> Collection[str]:
        """Models being loaded onto the device now (their bytes are already reserved)."""

    @property
    def host(self) -> Collection[str]:
        """Models held in the host tier (a load from there skips the disk)."""

    @property
    def busy(self) -> Collection[str]:
        """Models with work in flight: they must not be evicted."""

    @property
    def device_budget(self) -> int:
        """Byte budget of the device tier."""

    @property
    def device_free(self) -> int:
        """Budget minus resident and reserved (loading) bytes."""

    def model_bytes(self, model: str) -> int:
        """Device bytes that loading ``model`` adds (and evicting it frees)."""


@dataclass(slots=True)
class TierSnapshot:
    """A frozen ``TierView``: what tests, the simulator and a simple engine hand to ``schedule``."""

    sizes: Mapping[str, int]  # model -> device bytes
    device_budget: int
    resident: frozenset[str] = frozenset()
    loading: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    busy: frozenset[str] = frozenset()
    device_free: int = -1  # -1: budget minus the sizes of resident and loading models

    def __post_init__(self) -> None:
        if self.device_free < 0:
            used = sum(self.sizes[m] for m in self.resident | self.loading)
            self.device_free = self.device_budget - used

    def model_bytes(self, model: str) -> int:
        return self.sizes[model]


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Limits every policy obeys alike (the baselines get the same ones)."""

    max_batch_requests: int = 64  # requests in one batch
    max_batch_tokens: int = 8192  # tokens in one batch (a single longer request still runs alone)
    max_queue_per_model_class: int = 1024  # a full model+class queue rejects with Overloaded
    max_prefetch: int = 1  # models one step may start loading in the background
    rate_window_s: float = 60.0  # time constant of the per-model arrival-rate estimate

    def __post_init__(self) -> None:
        for name in ("max_batch_requests", "max_batch_tokens", "max_queue_per_model_class"):
            if getattr(self, name) < 1:
                raise InvalidConfig(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefetch < 0 or self.rate_window_s <= 0:
            raise InvalidConfig(
                f"max_prefetch must be >= 0 and rate_window_s > 0, "
                f"got {self.max_prefetch} and {self.rate_window_s}"
            )


@dataclass(slots=True)
class Step:
    """One decision of ``schedule``: what the engine does next, in this order."""

    seq: int  # 1, 2, ... per scheduler
    model: str | None  # the model whose batch runs; None when there is nothing to run now
    batch: list[Request]  # run these as one batch on ``model``, in this order; empty when ``model`` is None
    expired: list[Request]  # fail these as timeouts; they were taken out of the queues and must never run
    load_needed: bool  # ``model`` is not resident: load it (or wait for its load in flight) as it runs
    evict: list[str]  # evict these from the device first, in order (never busy, loading or ``model``)
    prefetch: list[str]  # then start loading these in the background; they overlap the batch
    estimated_seconds: float  # predicted wall time of the load (if any) and the batch
    tokens: int  # total tokens this step computes (of the spans below)
    kind: StepKind  # why this batch was chosen (real-time, batch, or batch forced by the starvation bound)
    started: float = 0.0  # clock time ``schedule`` returned it
    load_source: Tier = Tier.DEVICE  # where ``model``'s weights come from when ``load_needed``
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # request id -> inputs [start, end)
    # every model holding weights (resident or in the host tier) in the policy's eviction order, first to
    # go first: the order the weight manager follows for evictions it must make while the step runs
    eviction_order: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _LoadInFlight:
    started: float
    predicted_s: float


class Scheduler:
    """Decides, step by step, which model runs which batch; see the module docstring for the contract."""

    def __init__(
        self,
        policy: Policy | str = "fastptm",
        costs: CostModel | None = None,
        limits: SchedulerLimits = SchedulerLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.costs = costs if costs is not None else CostModel()
        self.limits = limits
        self.clock = clock
        self.queues = RequestQueues(limits.max_queue_per_model_class)
        self.stats: dict[str, ModelStats] = {}
        self._sizes: dict[str, int] = {}  # last seen device bytes per model
        self._resident: frozenset[str] = frozenset()  # as of the last schedule
        self._loads: dict[str, _LoadInFlight] = {}  # prefetches started by our steps, not yet done
        self._outstanding: Step | None = None
        self.running: dict[int, Request] = {}  # scheduled at least once and not finished, by id
        self._seq = 0
        self._timeouts: dict[RequestClass, float] = {}  # EWMA of (deadline - arrival) per class
        self.active: dict[str, dict[int, Request]] = {}  # decoder model -> its started generation requests
        self._generators: set[str] = set()  # models that have had generation requests
        self._ran_at: dict[int, int] = {}  # active request id -> seq of the last step that carried it
        self._last_model: str | None = None  # the model of the last step

    # -- requests -------------------------------------------------------------------------------------

    def register(self, model: str, nbytes: int, compute_bytes: int | None = None) -> None:
        """Tell the scheduler ``model``'s device bytes before a ``TierView`` shows it, so that its first
        requests get cost predictions from its size (otherwise only the per-batch overhead is known).
        ``compute_bytes``: all of its weights' bytes, when groups placed in the host tier make its device
        bytes smaller than what it computes with."""
        self._sizes[model] = nbytes
        if compute_bytes is not None and compute_bytes != nbytes:
            self.costs.set_compute_bytes(model, compute_bytes)

    def submit(self, req: Request) -> None:
        """Queue ``req`` for its model and class.

        Raises:
            InvalidInput: ``req.tokens`` < 1.
            DeadlineExceeded: the deadline has passed, or (for predictive policies) it cannot be met even
                if the request ran alone right now; the request was not queued.
            Overloaded: the queue of that model and class is full; the request was not queued.
        """
        if req.tokens < 1:
            raise InvalidInput(f"a request needs at least one token, got {req.tokens}")
        now = self.clock()
        if req.deadline <= now:
            raise DeadlineExceeded(f"request {req.id} for {req.model!r}: deadline already passed")
        if self.policy.predictive_expiry:
            nbytes = self._sizes.get(req.model, 0)
            inflight = self._loads.get(req.model)
            if req.model in self._resident:
                load = 0.0
            elif inflight is not None:
                load = max(0.0, inflight.started + inflight.predicted_s - now)
            else:
                load = self.costs.load_seconds(nbytes)
            best = self.costs.step_seconds(load, self.costs.exec_seconds(req.model, req.tokens, nbytes))
            if now + best > req.deadline:
                raise DeadlineExceeded(
                    f"request {req.id} for {req.model!r} cannot finish in time: needs ~{best * 1e3:.1f} ms, "
                    f"has {(req.deadline - now) * 1e3:.1f} ms"
                )
        self.queues.push(req)
        req.status = RequestStatus.WAITING
        if req.generates:
            self._generators.add(req.model)
        seen = self._timeouts.get(req.cls)
        timeout = req.deadline - req.arrival
        self._timeouts[req.cls] = timeout if seen is None else seen + 0.05 * (timeout - seen)
        stats = self.stats.get(req.model)
        if stats is None:
            stats = self.stats[req.model] = ModelStats()
        stats.arrive(now, self.limits.rate_window_s)

    def cancel(self, request_id: int, status: RequestStatus = RequestStatus.CANCELLED) -> Request | None:
        """End a live request as ``status`` (CANCELLED, or FAILED when the engine gives up on it): a
        queued one leaves its queue now (its slot is free at once); one in the step running now is not
        continued after it. Returns the request, or None when it is not live."""
        req = self.queues.get(request_id)
        if req is not None:
            self.queues.remove(req)
        else:
            req = self.running.get(request_id)
            if req is None:
                return None
        self._end(req, status)
        return req

    def expire(self, now: float | None = None) -> list[Request]:
        """Take every queued request whose deadline is at or before ``now`` (default: the clock) out of
        the queues, as TIMED_OUT; the engine fails them. Requests in the step running now are not touched:
        their result is checked against their deadline on delivery."""
        now = self.clock() if now is None else now
        out = []
        while (head := self.queues.earliest()) is not None and head.deadline <= now:
            self.queues.remove(head)
            self._end(head, RequestStatus.TIMED_OUT)
            out.append(head)
        return out

    def drop(self, model: str | None = None) -> list[Request]:
        """Take every queued request and active generation (of ``model``, or of every model) out, as
        FAILED; the engine fails them (an unloaded model, or a scheduling error that would otherwise
        repeat forever)."""
        out = []
        for cls in RequestClass:
            for m in [model] if model is not None else list(self.queues.models(cls)):
                out.extend(self.queues.queue(m, cls))
        for req in out:
            self.queues.remove(req)
        for m in [model] if model is not None else list(self.active):
            out.extend(self.active.get(m, {}).values())
        for req in out:
            self._end(req, RequestStatus.FAILED)
        return out

    def _end(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.running.pop(req.id, None)
        self._ran_at.pop(req.id, None)
        seqs = self.active.get(req.model)
        if seqs is not None and seqs.pop(req.id, None) is not None and not seqs:
            del self.active[req.model]

    def pending(self) -> int:
        """Requests queued (parts of split requests included) and not yet handed out by ``schedule``,
        plus the active generation requests (they need more steps)."""
        return len(self.queues) + sum(len(seqs) for seqs in self.active.values())

    def generating(self) -> str | None:
        """The decoder model whose active sequences hold the KV cache, if any."""
        return next(iter(self.active), None)

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued requests."""
        head = self.queues.earliest()
        return head.deadline if head else None

    def wake_at(self) -> float | None:
        """When an engine that got an IDLE step (or None) should call ``schedule`` again at the latest if
        nothing else happens (no ``submit``, no load ending): the earliest queued deadline, or sooner when
        the policy holds work back (fastptm lets batch work for a cold model gather until it is owed).
        None when nothing is queued."""
        times = [t for t in (self.next_deadline(), self.policy.wake_at(self.queues)) if t is not None]
        return min(times) if times else None

    # -- decisions ------------------------------------------------------------------------------------

    def schedule(self, view: TierView) -> Step | None:
        """Decide the next step given the tiers as they are now.

        Returns None when nothing is queued. Otherwise a ``Step``; its ``batch`` is empty (kind IDLE) when
        nothing can run now: every candidate's bytes are held by busy or loading models, or the policy
        holds work back (see ``wake_at``).

        Raises:
            RuntimeError: the previous step has not been reported with ``on_step_done``.
        """
        if self._outstanding is not None:
            raise RuntimeError(f"step {self._outstanding.seq} is still outstanding; call on_step_done first")
        holder = self.generating()
        if not self.queues and holder is None:
            return None
        ctx = self._context(view)
        self.policy.expire(ctx)
        for req in ctx.expired:
            self._end(req, RequestStatus.TIMED_OUT)
        chosen = self._choose(ctx, holder)
        self._seq += 1
        batch: list[Request] = []
        if chosen is not None:
            plan, evict = chosen
            if plan.model in self._generators:
                batch, spans = self._generation_batch(plan.model)
            else:
                batch, spans = plan.batch, self._spans(plan.batch)
        if not batch:
            return Step(self._seq, None, [], ctx.expired, False, [], [], 0.0, 0, StepKind.IDLE, ctx.now)
        for req in batch:
            if req.id in self.queues:
                self.queues.remove(req)
            req.status = RequestStatus.RUNNING
            self.running[req.id] = req
            if req.generates:
                self._ran_at[req.id] = self._seq
        model = plan.model
        self._last_model = model
        tokens = sum(r.span_tokens(spans[r.id]) for r in batch)
        load_needed = not ctx.is_resident(model)
        step = Step(
            seq=self._seq,
            model=model,
            batch=batch,
            expired=ctx.expired,
            load_needed=load_needed,
            evict=evict,
            prefetch=[],
            estimated_seconds=ctx.step_seconds(model, tokens),
            tokens=tokens,
            kind=plan.kind,
            started=ctx.now,
            load_source=ctx.source(model),
            spans=spans,
        )
        self._add_prefetch(ctx, step)
        holding = set(ctx.view.resident) | set(ctx.view.host)
        step.eviction_order = self.policy.eviction_order(ctx, sorted(holding - {model}))
        stats = self.stats.setdefault(model, ModelStats())
        stats.last_used = ctx.now
        self.policy.on_step(ctx, step)
        self._outstanding = step
        return step

    def _choose(self, ctx: Context, holder: str | None) -> tuple[Plan, list[str]] | None:
        """The policy's first plan that can run now, and what to evict for it; or, while ``holder`` has
        active sequences, its next step when the policy chose it or the last step was another model's."""
        chosen: tuple[Plan, list[str]] | None = None
        for plan in self.policy.plans(ctx):
            if not plan.batch:
                continue
            if holder is not None and plan.model != holder and plan.model in self._generators:
                continue  # another decoder model waits until the holder's sequences are done
            evict = self._room(ctx, ctx.missing_bytes(plan.model), ctx.device_free, {plan.model})
            if evict is not None:
                chosen = (plan, evict)
                break
        if holder is not None and (chosen is None or chosen[0].model == holder or self._last_model != holder):
            evict = self._room(ctx, ctx.missing_bytes(holder), ctx.device_free, {holder})
            if evict is not None:
                kind = (
                    chosen[0].kind if chosen is not None and chosen[0].model == holder else StepKind.REALTIME
                )
                chosen = (Plan(holder, [], kind), evict)
        return chosen

    def _generation_batch(self, model: str) -> tuple[list[Request], dict[int, tuple[int, int]]]:
        """The next step of decoder ``model`` and each request's span ``(0, n)``: ``n`` of its pending
        tokens. Decodes first, then prefills still going (each set least recently run first, so that a
        token limit smaller than the batch rotates them), then waiting requests by deadline unless
        another decoder model waits for the KV cache."""
        budget = self.limits.max_batch_tokens
        batch: list[Request] = []
        spans: dict[int, tuple[int, int]] = {}
        started = sorted(
            self.active.get(model, {}).values(), key=lambda r: (r.tokens > 1, self._ran_at.get(r.id, 0))
        )
        others_wait = any(m != model and self.queues.has(m) for m in self._generators)
        waiting = [] if others_wait else list(self.queues.in_order(model, by="deadline"))
        for req in [*started, *waiting]:
            if len(batch) >= self.limits.max_batch_requests or budget < 1:
                break
            n = min(req.tokens, budget)
            batch.append(req)
            spans[req.id] = (0, n)
            budget -= n
        return batch, spans

    def _spans(self, batch: list[Request]) -> dict[int, tuple[int, int]]:
        """What each request of ``batch`` computes in this step: all its remaining inputs, unless they do
        not fit the token limit (a request larger than it runs alone, a part at a time)."""
        budget = self.limits.max_batch_tokens
        spans = {}
        for req in batch:
            span = req.next_span(max(budget, 1))
            spans[req.id] = span
            budget -= req.span_tokens(span)
        return spans

    def _context(self, view: TierView) -> Context:
        now = self.clock()
        for m in list(self._loads):
            if m not in view.loading:  # finished or failed without on_load_done: stop predicting it
                del self._loads[m]
        self._resident = frozenset(view.resident)
        return Context(
            now=now,
            view=view,
            queues=self.queues,
            costs=self.costs,
            limits=self.limits,
            stats=self.stats,
            sizes=self._sizes,
            load_remaining={m: max(0.0, ld.started + ld.predicted_s - now) for m, ld in self._loads.items()},
            typical_timeout=self._timeouts,
        )

    def _room(
        self, ctx: Context, need: int, free: int, protect: set[str], prefetch: str | None = None
    ) -> list[str] | None:
        """Models to evict so that ``need`` bytes fit in ``free`` (for a prefetch of ``prefetch``, only
        victims the policy allows for it); None when that is impossible."""
        if need <= free:
            return []
        view = ctx.view
        busy, loading = set(view.busy) | set(self.active), set(view.loading)
        candidates = [m for m in view.resident if m not in protect and m not in busy and m not in loading]
        if prefetch is None:
            order = self.policy.eviction_order(ctx, candidates)
        else:
            order = self.policy.prefetch_victims(ctx, candidates, prefetch)
        evict: list[str] = []
        for m in order:
            if free >= need:
                break
            evict.append(m)
            free += ctx.nbytes(m)
        return evict if free >= need else None

    def _add_prefetch(self, ctx: Context, step: Step) -> None:
        if self.limits.max_prefetch == 0 or step.model is None:
            return
        free = ctx.device_free + sum(ctx.nbytes(m) for m in step.evict) - ctx.missing_bytes(step.model)
        protect = {step.model, *step.evict}
        # The load channel is busy with loads in flight, then with this step's own load, then prefetches.
        channel_free = ctx.now + ctx.channel_wait
        if step.load_needed and not ctx.is_loading(step.model):
            channel_free += ctx.costs.load_seconds(ctx.nbytes(step.model), ctx.source(step.model))
        for model in self.policy.prefetch(ctx, step.model, free, step.estimated_seconds):
            if len(step.prefetch) >= self.limits.max_prefetch:
                break
            if model in protect or ctx.is_resident(model) or model in ctx.view.loading:
                continue
            need = ctx.nbytes(model)
            more = self._room(ctx, need, free, protect | {model} | set(step.evict), prefetch=model)
            if more is None:
                continue
            more = [m for m in more if m not in step.evict]
            step.evict.extend(more)
            free += sum(ctx.nbytes(m) for m in more) - need
            protect.add(model)
            step.prefetch.append(model)
            seconds = ctx.costs.load_seconds(need, ctx.source(model))
            self._loads[model] = _LoadInFlight(channel_free, seconds)
            channel_free += seconds

    # -- feedback -------------------------------------------------------------------------------------

    def on_step_done(
        self,
        step: Step,
        exec_seconds: float,
        load_seconds: float = 0.0,
        loaded_bytes: int = 0,
        ok: bool = True,
        progress: Mapping[int, int] | None = None,
        tokens: int | None = None,
    ) -> list[Request]:
        """Report that ``step`` finished (or failed, ``ok=False``); returns the requests it finished.

        A request whose span left inputs to compute goes back to its queue (it stays RUNNING) unless it
        was cancelled meanwhile; the others become FINISHED (FAILED when not ``ok``) and leave
        ``running``. The engine delivers what is returned.

        ``progress`` (generation requests of the step): request id -> tokens it must compute before its
        next one, 0 when it finished. A generation request missing from it did not start (no free KV
        cache blocks) and waits in its queue again; an active one missing from it is left as it was.

        Args:
            exec_seconds: time the batch computed, without waiting for weights; 0 when not measured.
            load_seconds: time its demand load took (``loaded_bytes`` moved); 0 when it needed none. When
                ``step.load_needed`` and this is 0, ``exec_seconds`` is taken to include the load and is not
                used to refine the execution costs.
            tokens: the tokens the step really computed (the runner skips requests cancelled before it
                started); None: all of ``step.tokens``.

        Measurements refine the cost model; a failed step only releases the worker. Reporting a step with
        nothing to run (``model`` None) is allowed and does nothing.
        """
        if step.model is None:
            return []
        if self._outstanding is not step:
            raise RuntimeError(f"step {step.seq} is not the outstanding step")
        self._outstanding = None
        if not ok:
            for req in step.batch:
                if not req.status.is_finished:
                    self._end(req, RequestStatus.FAILED)
            return []
        finished = self._advance(step, progress or {})
        carried = {r.id for r in step.batch}
        for request_id, pending in (progress or {}).items():  # sequences the step preempted
            req = self.running.get(request_id)
            if req is not None and request_id not in carried and pending > 0:
                req.tokens = pending
        nbytes = self._sizes.get(step.model, 0)
        pure = not step.load_needed or load_seconds > 0
        computed = step.tokens if tokens is None else tokens
        if pure and computed > 0 and exec_seconds > 0 and math.isfinite(exec_seconds):
            self.costs.observe_exec(step.model, computed, exec_seconds, nbytes)
        if load_seconds > 0 and loaded_bytes > 0:
            self.costs.observe_load(loaded_bytes, load_seconds, step.load_source)
        self.stats.setdefault(step.model, ModelStats()).last_used = self.clock()
        return finished

    def _advance(self, step: Step, progress: Mapping[int, int]) -> list[Request]:
        finished = []
        for req in step.batch:
            if req.status.is_finished:  # cancelled while it ran
                continue
            if req.generates:
                if self._generation_done(req, progress.get(req.id)):
                    finished.append(req)
                continue
            start, end = step.spans.get(req.id, (req.done_inputs, req.total_inputs))
            if end < req.total_inputs:
                req.done_inputs = end
                req.tokens = sum(req.inputs[end:])
                self.queues.push(req, admitted=True)
            else:
                self._end(req, RequestStatus.FINISHED)
                finished.append(req)
        return finished

    def _generation_done(self, req: Request, pending: int | None) -> bool:
        """Apply a generation request's progress; True when it finished."""
        seqs = self.active.get(req.model, {})
        if pending is None:
            if req.id not in seqs:  # it could not start: it waits again, with its first-token deadline
                self.running.pop(req.id, None)
                self._ran_at.pop(req.id, None)
                self.queues.push(req, admitted=True)
                req.status = RequestStatus.WAITING
            return False
        if pending == 0:
            self._end(req, RequestStatus.FINISHED)
            return True
        req.tokens = pending
        self.active.setdefault(req.model, {})[req.id] = req
        return False

    def on_load_done(
        self, model: str, seconds: float, nbytes: int, source: Tier = Tier.HOST, ok: bool = True
    ) -> None:
        """Report that a background load of ``model`` finished (``ok``) or failed after ``seconds``."""
        self._loads.pop(model, None)
        if ok:
            self.costs.observe_load(nbytes, seconds, source)
            stats = self.stats.setdefault(model, ModelStats())
            stats.last_used = max(stats.last_used, self.clock())
