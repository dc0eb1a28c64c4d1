"""Support for the scheduler tests (no tests here): a fake clock, an exact cost model, a fake runner."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ptmserve.engine.costs import CostModel, DeviceProfile
from ptmserve.engine.requests import Request, RequestClass
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits, Step, TierSnapshot

MB = 1_000_000
SIZE = 100 * MB  # every test model: 0.1 s to load, 0.01 s + 1 ms/token to run (see PROFILE)

# Exact, noise-free costs: load = bytes / 1 GB/s; exec = 0.01 s + tokens * 1 ms; loads never overlap compute.
PROFILE = DeviceProfile(
    name="test",
    host_to_device_bps=1e9,
    disk_to_host_bps=1e9,
    load_latency_s=0.0,
    batch_overhead_s=0.01,
    flops=5e10,  # 2 * (1e8 / 4) / 5e10 = 1 ms per token
    bytes_per_param=4.0,
    pipeline_stages=1,
    copy_overlap=0.0,
)
RT, BATCH = RequestClass.REALTIME, RequestClass.BATCH


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_scheduler(policy: str = "fastptm", clock: FakeClock | None = None, **limits: int) -> Scheduler:
    return Scheduler(policy, CostModel(PROFILE), SchedulerLimits(**limits), clock or FakeClock())


_ids = itertools.count(1)


def req(model: str, cls: RequestClass, arrival: float, timeout: float, tokens: int = 10) -> Request:
    return Request(next(_ids), model, cls, arrival, arrival + timeout, tokens)


@dataclass
class FakeTiers:
    """A device of ``slots`` equal models; what the engine's weight manager would report."""

    slots: int
    resident: list[str] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)

    def view(self) -> TierSnapshot:
        sizes = _Sizes()
        return TierSnapshot(
            sizes, self.slots * SIZE, frozenset(self.resident), busy=frozenset(self.busy), host=_EVERY_MODEL
        )

    def apply(self, step: Step) -> None:
        """Run the step's memory part: evictions, then its load and prefetches (instant here)."""
        for m in step.evict:
            assert m not in self.busy, f"evicted busy model {m}"
            self.resident.remove(m)
        for m in ([step.model] if step.load_needed else []) + step.prefetch:
            assert len(self.resident) < self.slots, "over budget"
            self.resident.append(m)


class _Everything(frozenset):
    """The host tier holds every model (only ``in`` is asked of it)."""

    def __contains__(self, item: object) -> bool:
        return True


_EVERY_MODEL = _Everything()


class _Sizes(dict):
    def __missing__(self, key: str) -> int:
        return SIZE


def run(
    sched: Scheduler,
    clock: FakeClock,
    tiers: FakeTiers,
    arrivals: Iterable[Request] = (),
    until: float = 1e9,
    on_step: Callable[[Step], None] | None = None,
) -> list[Step]:
    """A fake runner: submits ``arrivals`` at their times, runs each step for the exact predicted time of
    its load and batch, and returns every step (idle ones included) until nothing is left."""
    pending = sorted(arrivals, key=lambda r: r.arrival)
    steps: list[Step] = []
    i = 0
    while clock.t < until:
        while i < len(pending) and pending[i].arrival <= clock.t:
            sched.submit(pending[i])
            i += 1
        step = sched.schedule(tiers.view())
        if step is None:
            if i == len(pending):
                break
            clock.t = pending[i].arrival
            continue
        steps.append(step)
        if step.model is None:
            continue
        tiers.apply(step)
        if on_step:
            on_step(step)
        load = SIZE / 1e9 if step.load_needed else 0.0
        seconds = load + 0.01 + 0.001 * step.tokens
        end = clock.t + seconds
        while i < len(pending) and pending[i].arrival <= end:
            clock.t = pending[i].arrival
            sched.submit(pending[i])
            i += 1
        clock.t = end
        sched.on_step_done(step, seconds - load, load, SIZE if step.load_needed else 0)
    return steps
