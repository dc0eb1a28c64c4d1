"""Run the real ``Scheduler`` under a virtual clock against simulated weight tiers and a simulated device.

The simulated executor plays the engine's part of the contract in ``ptmserve.engine.scheduler``: it
implements ``TierView`` with byte-exact budget accounting, executes evictions, demand loads and prefetches
on one load channel (loads run one after another, overlapping compute), and runs each batch for the time a
"true" cost model says (optionally with seeded noise). The scheduler keeps its own cost model and learns the
truth from what the executor reports, as it would on a real device.

Hours of traffic over hundreds of models take seconds: time jumps from event to event.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ptmserve.engine.costs import CostModel, DeviceProfile, Tier
from ptmserve.engine.requests import (
    ClassDefaults,
    Outcome,
    Request,
    RequestClass,
    deadline_from,
    request_class,
)
from ptmserve.engine.scheduler import Scheduler, Step
from ptmserve.errors import DeadlineExceeded, Overloaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace, as a client sends it (Triton schedule-policy parameters)."""

    time: float  # seconds from the start of the trace
    model: str
    tokens: int
    priority: int  # 1 = real-time, >= 2 batch, 0 = the model's default class
    timeout_us: int | None  # None or 0: the class's default timeout


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated machine."""

    sizes: Mapping[str, int]  # device bytes per model
    device_budget: int  # bytes
    truth: DeviceProfile  # how fast the simulated device really is
    host_budget: int | None = None  # bytes of the host tier; None: every model is held there
    exec_params: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # true (a, b) per model
    exec_noise: float = 0.0  # sigma of a log-normal factor on each batch's true time
    seed: int = 0
    defaults: ClassDefaults = ClassDefaults()
    warm: Sequence[str] = ()  # models resident on the device at time 0 (as many as fit)


@dataclass(slots=True)
class Record:
    """The fate of one request."""

    id: int
    model: str
    cls: RequestClass
    arrival: float
    deadline: float
    outcome: Outcome | None = None
    finish: float | None = None  # when its result (or its failure) was delivered
    started: float | None = None  # when the step that ran it started (None: it never ran)


@dataclass(slots=True)
class SimResult:
    policy: str
    duration: float  # span of the trace (last arrival time)
    end: float  # virtual time when the last request ended
    records: list[Record]
    loads: int = 0  # model loads onto the device (switches), prefetches included
    prefetches: int = 0  # loads started as prefetches
    prefetches_unused: int = 0  # prefetched models evicted before any step ran them
    loaded_bytes: int = 0
    evictions: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # time the device spent on steps (compute and waited-for loads)
    max_device_bytes: int = 0  # high-water mark of accounted device bytes
    loads_per_model: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Load:
    start: float
    finish: float
    nbytes: int
    source: Tier
    prefetch: bool


class SimTiers:
    """Simulated host and device tiers: a ``TierView`` plus the operations the engine would run."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.sizes = config.sizes
        self.device_budget = config.device_budget
        self.resident_set: set[str] = set()
        self.loads: dict[str, _Load] = {}
        self.host_set: dict[str, None] = {}  # LRU order when the host tier is bounded
        self.host_all = config.host_budget is None
        self.used = 0
        self.channel_free = 0.0  # when the load channel finishes its queued work
        self.max_used = 0
        self.evictions = 0
        self.unused: set[str] = set()  # prefetched, not run since
        self.prefetches_unused = 0
        self.truth = CostModel(config.truth)
        for m in config.warm:
            if self.used + self.sizes[m] <= self.device_budget:
                self.resident_set.add(m)
                self.used += self.sizes[m]
                self._touch_host(m)

    # TierView
    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self.resident_set)

    @property
    def loading(self) -> frozenset[str]:
        return frozenset(self.loads)

    @property
    def host(self) -> Iterable[str]:
        return self.sizes.keys() if self.host_all else self.host_set.keys()

    @property
    def busy(self) -> frozenset[str]:
        return frozenset()  # schedule() is only called between steps; loads in flight are ``loading``

    @property
    def device_free(self) -> int:
        return self.device_budget - self.used

    def model_bytes(self, model: str) -> int:
        return self.sizes[model]

    # operations
    def evict(self, model: str) -> None:
        if model in self.loads or model not in self.resident_set:
            raise AssertionError(f"scheduler asked to evict {model!r}, which is loading or not resident")
        self.resident_set.remove(model)
        self.used -= self.sizes[model]
        self.evictions += 1
        if model in self.unused:
            self.unused.discard(model)
            self.prefetches_unused += 1

    def start_load(self, model: str, now: float, prefetch: bool) -> _Load:
        """Queue a load of ``model`` on the load channel; its bytes are reserved from now."""
        if model in self.loads:
            return self.loads[model]
        nbytes = self.sizes[model]
        if self.used + nbytes > self.device_budget:
            raise AssertionError(f"loading {model!r} would exceed the device budget")
        source = Tier.HOST if (self.host_all or model in self.host_set) else Tier.DISK
        start = max(now, self.channel_free)
        finish = start + self.truth.load_seconds(nbytes, source)
        self.channel_free = finish
        self.used += nbytes
        self.max_used = max(self.max_used, self.used)
        self._touch_host(model)
        load = self.loads[model] = _Load(start, finish, nbytes, source, prefetch)
        return load

    def finish_loads(self, now: float) -> list[tuple[str, _Load]]:
        """Loads finished by ``now``: their models become resident."""
        done = [(m, ld) for m, ld in self.loads.items() if ld.finish <= now]
        for m, _ in done:
            del self.loads[m]
            self.resident_set.add(m)
        return done

    def next_load_finish(self) -> float:
        return min((ld.finish for ld in self.loads.values()), default=math.inf)

    def _touch_host(self, model: str) -> None:
        if self.host_all:
            return
        self.host_set.pop(model, None)
        self.host_set[model] = None
        budget = self.config.host_budget or 0
        while sum(self.sizes[m] for m in self.host_set) > budget and len(self.host_set) > 1:
            victim = next(iter(self.host_set))
            if victim == model:
                break
            del self.host_set[victim]


class SimClock:
    """A settable virtual clock for the scheduler."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(
    arrivals: Sequence[Arrival], scheduler: Scheduler, clock: SimClock, config: SimConfig, policy: str = ""
) -> SimResult:
    """Play ``arrivals`` (sorted by time) through ``scheduler`` on the simulated machine of ``config``.

    ``scheduler`` must read ``clock``. Every request ends with exactly one outcome; a request whose batch
    ends after its deadline counts as a timeout (the engine would fail it the same way).
    """
    for model, nbytes in config.sizes.items():
        scheduler.register(model, nbytes)
    sim = _Sim(arrivals, scheduler, clock, config)
    sim.run()
    duration = arrivals[-1].time if arrivals else 0.0
    result = SimResult(policy or scheduler.policy.name, duration, sim.now, sim.records, **sim.counters)
    result.evictions = sim.tiers.evictions
    result.prefetches_unused = sim.tiers.prefetches_unused
    result.max_device_bytes = sim.tiers.max_used
    result.loads_per_model = sim.loads_per_model
    return result


class _Sim:
    def __init__(self, arrivals: Sequence[Arrival], scheduler: Scheduler, clock: SimClock, config: SimConfig):
        self.arrivals = arrivals
        self.sched = scheduler
        self.clock = clock
        self.config = config
        self.tiers = SimTiers(config)
        self.truth = self.tiers.truth
        for m, (a, b) in config.exec_params.items():
            self.truth.set_exec(m, a, b)
        self.rng = random.Random(config.seed)
        self.records: list[Record] = []
        self.i = 0
        self.now = 0.0
        self.counters = {"loads": 0, "prefetches": 0, "loaded_bytes": 0, "steps": 0, "busy_seconds": 0.0}
        self.loads_per_model: dict[str, int] = {}

    def run(self) -> None:
        while True:
            self._admit(self.now)
            self._finish_loads(self.now)
            self.clock.t = self.now
            step = self.sched.schedule(self.tiers)
            if step is not None:
                self._fail(step.expired, self.now)
            if step is None or step.model is None:
                nxt = min(self._next_arrival(), self.tiers.next_load_finish())
                for wake in (self.sched.wake_at(), self.sched.next_deadline()):
                    if wake is not None and wake > self.now:  # held-back work comes due, or expires
                        nxt = min(nxt, wake)
                if math.isinf(nxt):
                    break
                self.now = max(nxt, self.now)
                continue
            self._execute(step)
        if self.sched.pending():  # only when a model can never fit and its requests never expire
            stuck = [r for r in self.records if r.outcome is None]
            for r in stuck:
                self.sched.cancel(r.id)
            self._fail_records(stuck, self.now)

    def _next_arrival(self) -> float:
        return self.arrivals[self.i].time if self.i < len(self.arrivals) else math.inf

    def _admit(self, until: float) -> None:
        defaults = self.config.defaults
        while self.i < len(self.arrivals) and self.arrivals[self.i].time <= until:
            a = self.arrivals[self.i]
            self.clock.t = a.time
            cls = request_class(a.priority, defaults.default_class)
            deadline = deadline_from(a.timeout_us, cls, a.time, defaults)
            rec = Record(len(self.records), a.model, cls, a.time, deadline)
            self.records.append(rec)
            self.i += 1
            try:
                self.sched.submit(Request(rec.id, a.model, cls, a.time, deadline, a.tokens, rec))
            except Overloaded:
                self._end(rec, Outcome.REJECTED, a.time)
            except DeadlineExceeded:
                self._end(rec, Outcome.TIMEOUT, a.time)

    def _finish_loads(self, now: float) -> None:
        for model, ld in self.tiers.finish_loads(now):
            if ld.prefetch:
                self.clock.t = ld.finish
                self.sched.on_load_done(model, ld.finish - ld.start, ld.nbytes, ld.source)

    def _execute(self, step: Step) -> None:
        tiers, now = self.tiers, self.now
        assert step.model is not None
        for m in step.evict:
            tiers.evict(m)
        wait, loaded = 0.0, 0
        if step.load_needed:
            ld = tiers.loads.get(step.model)
            if ld is None:
                ld = tiers.start_load(step.model, now, prefetch=False)
                self._count_load(step.model, ld.nbytes)
                loaded = ld.nbytes
            else:
                ld.prefetch = False  # the step waits for it: report it with the step
            wait = ld.finish - now
        tiers.unused.discard(step.model)
        tiers.unused.update(step.prefetch)
        prefetched = [tiers.start_load(m, now, prefetch=True) for m in step.prefetch]
        for m, ld in zip(step.prefetch, prefetched, strict=True):
            self._count_load(m, ld.nbytes)
            self.counters["prefetches"] += 1
        exec_s = self.truth.exec_seconds(step.model, step.tokens, tiers.sizes[step.model])
        if self.config.exec_noise > 0:
            exec_s *= math.exp(self.rng.gauss(0.0, self.config.exec_noise))
        seconds = self.truth.step_seconds(wait, exec_s)
        # A copy that does not hide behind compute (same cores) slows the batch it overlaps.
        contention = self.config.truth.contention * sum(
            max(0.0, min(now + seconds, ld.finish) - max(now + wait, ld.start)) for ld in prefetched
        )
        exec_s += contention
        # The CPU work around the batch (schedule, admit and deliver each request) keeps the device's
        # step loop busy too; the engine's runner does not count it in the compute it reports.
        seconds += contention + self.config.truth.overhead_seconds(len(step.batch))
        end = now + seconds
        self._admit(end)
        self.now = end
        self._finish_loads(end)
        self.counters["steps"] += 1
        self.counters["busy_seconds"] += seconds
        for req in step.batch:
            rec: Record = req.payload  # type: ignore[assignment]
            rec.started = now
            self._end(rec, Outcome.SUCCESS if end <= rec.deadline else Outcome.TIMEOUT, end)
        self.clock.t = end
        self.sched.on_step_done(step, exec_s, wait if loaded else 0.0, loaded)

    def _count_load(self, model: str, nbytes: int) -> None:
        self.counters["loads"] += 1
        self.counters["loaded_bytes"] += nbytes
        self.loads_per_model[model] = self.loads_per_model.get(model, 0) + 1

    def _fail(self, reqs: list[Request], now: float) -> None:
        self._fail_records([r.payload for r in reqs], now)  # type: ignore[misc]

    def _fail_records(self, recs: list[Record], now: float) -> None:
        for rec in recs:
            self._end(rec, Outcome.TIMEOUT, now)

    @staticmethod
    def _end(rec: Record, outcome: Outcome, now: float) -> None:
        if rec.outcome is not None:
            raise AssertionError(f"request {rec.id} ended twice ({rec.outcome.value}, then {outcome.value})")
        rec.outcome = outcome
        rec.finish = now
