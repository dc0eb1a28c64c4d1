"""What each policy decides: fastptm's classes, switching, prefetch, eviction and bounds; the baselines."""

from __future__ import annotations

import pytest

from ptmserve.engine.costs import CostModel
from ptmserve.engine.policies import FastPtm, FastPtmOptions, PolicyName, make_policy
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits, StepKind
from ptmserve.errors import InvalidConfig
from tests.engine.test_scheduler_support import (
    BATCH,
    PROFILE,
    RT,
    FakeClock,
    FakeTiers,
    make_scheduler,
    req,
    run,
)


def test_policies_by_name() -> None:
    assert [p.value for p in PolicyName] == ["fastptm", "fifo-lru", "edf-lru", "fifo-naive"]
    for name in PolicyName:
        assert make_policy(name).name == name.value
    assert make_policy("fifo-lru", predictive_expiry=True).predictive_expiry
    assert not make_policy("fifo-lru").predictive_expiry
    with pytest.raises(InvalidConfig, match="fifo-lru"):
        make_policy("round-robin")


def test_realtime_request_arriving_during_batch_work_runs_next() -> None:
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    tiers = FakeTiers(slots=2, resident=["a", "b"])
    work = [req("a", BATCH, 0.0, 60.0) for _ in range(50)]
    urgent = req("b", RT, 0.0, 1.0)  # arrival set when it is submitted
    seen: list[int] = []

    def submit_during_first_step(step) -> None:  # noqa: ANN001
        seen.append(step.seq)
        if len(seen) == 1:
            assert step.kind is StepKind.BATCH
            urgent.arrival, urgent.deadline = clock.t, clock.t + 1.0
            sched.submit(urgent)

    steps = run(sched, clock, tiers, work, on_step=submit_during_first_step)
    assert urgent in steps[1].batch and steps[1].kind is StepKind.REALTIME
    assert sum(len(s.batch) for s in steps) == 51


def test_batch_is_not_starved_under_sustained_realtime_load() -> None:
    options = FastPtmOptions(batch_max_wait_s=1.0, rt_streak=3)
    clock = FakeClock()
    sched = Scheduler(FastPtm(options), CostModel(PROFILE), SchedulerLimits(), clock)
    tiers = FakeTiers(slots=3, resident=["a", "c", "b"])
    # Real-time requests for two models every 10 ms (each needs 10 ms + its batch overhead): the device
    # never runs out of real-time work, so batch work only runs when it is owed.
    flood = [req(m, RT, i * 0.01, 0.5) for i in range(600) for m in ("a", "c")]
    starving = req("b", BATCH, 0.05, 30.0)
    steps = run(sched, clock, tiers, [*flood, starving], until=5.0)
    assert all(s.kind is not StepKind.BATCH for s in steps)  # real-time work was always waiting
    served = next(i for i, s in enumerate(steps) if starving in s.batch)
    owed_at = starving.arrival + options.batch_max_wait_s
    after = [s for s in steps[:served] if s.started >= owed_at]
    # The stated bound: once owed, it runs within rt_streak real-time steps (plus the owed steps ahead: none).
    assert len(after) <= options.rt_streak
    assert steps[served].kind is StepKind.FORCED
    assert steps[served].started >= owed_at  # and not before it was owed: real-time work came first
    # One forced step, then real-time work again.
    assert steps[served + 1].kind is StepKind.REALTIME


def test_fastptm_prefers_the_resident_model_while_deadlines_allow() -> None:
    sched = make_scheduler()
    tiers = FakeTiers(slots=1, resident=["a"])
    sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("b", RT, 0.0, 1.0))
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "a" and not step.load_needed and not step.evict


def test_fastptm_switches_when_staying_would_lose_a_request() -> None:
    sched = make_scheduler()
    tiers = FakeTiers(slots=1, resident=["a"])
    sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("b", RT, 0.0, 0.13))  # 0.1 s load + 0.02 s: only if it goes first
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "b" and step.load_needed and step.evict == ["a"]


def test_fastptm_runs_first_the_short_step_that_the_best_rate_would_doom() -> None:
    """Issue 13: 20 requests on the resident model score the higher rate, but running them first dooms
    the cold model's one request, while running that one first (0.12 s) dooms none of the 20."""
    sched = make_scheduler()
    tiers = FakeTiers(slots=2, resident=["a"])
    for _ in range(20):
        sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("b", RT, 0.0, 0.3))
    steps = run(sched, sched.clock, tiers)  # type: ignore[arg-type]
    assert [s.model for s in steps if s.model] == ["b", "a"]
    assert all(r.status.name == "FINISHED" for s in steps for r in s.batch)


def test_fifo_naive_runs_one_request_per_step_in_arrival_order() -> None:
    clock = FakeClock()
    sched = make_scheduler("fifo-naive", clock=clock)
    arrivals = [
        req(m, cls, 0.001 * i, 5.0)
        for i, (m, cls) in enumerate(zip("aabab", (RT, BATCH, RT, RT, BATCH), strict=True))
    ]
    steps = [s for s in run(sched, clock, FakeTiers(slots=1), arrivals) if s.batch]
    assert [len(s.batch) for s in steps] == [1] * 5
    assert [s.batch[0].id for s in steps] == [r.id for r in arrivals]
    assert [s.load_needed for s in steps] == [True, False, True, True, True]  # a, a, b, a, b: 4 switches


def test_fifo_and_edf_are_switch_naive() -> None:
    for policy in ("fifo-lru", "edf-lru", "fifo-naive"):
        sched = make_scheduler(policy)
        sched.submit(req("b", RT, 0.0, 0.9))  # first and earliest: the baselines switch for it
        sched.submit(req("a", RT, 0.0, 1.0))
        step = sched.schedule(FakeTiers(slots=1, resident=["a"]).view())
        assert step is not None and step.model == "b" and step.evict == ["a"]


def test_prefetch_runs_while_a_batch_runs_just_in_time() -> None:
    # "a" runs for 0.02 s; "b" needs 0.12 s (load included) and must start within 4 such steps: prefetch it.
    sched = make_scheduler()
    tiers = FakeTiers(slots=2, resident=["a"])
    sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("b", RT, 0.0, 0.18))
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "a" and step.prefetch == ["b"] and not step.evict
    # With time to spare, "b" is not loaded yet: more of its requests may come to share the switch.
    sched = make_scheduler()
    sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("b", RT, 0.0, 1.0))
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "a" and step.prefetch == []
    for policy in ("fifo-lru", "edf-lru"):  # the baselines load on demand only
        base = make_scheduler(policy)
        base.submit(req("a", RT, 0.0, 1.0))
        base.submit(req("b", RT, 0.0, 1.0))
        assert base.schedule(FakeTiers(slots=2, resident=["a"]).view()).prefetch == []  # type: ignore[union-attr]


def test_prefetch_never_evicts_a_model_with_queued_realtime_work() -> None:
    sched = make_scheduler()
    tiers = FakeTiers(slots=2, resident=["a", "b"])
    for m in ("a", "b"):
        sched.submit(req(m, RT, 0.0, 1.0))
    sched.submit(req("c", RT, 0.0, 0.19))  # due soon enough to be prefetched, if there were room
    step = sched.schedule(tiers.view())
    assert step is not None and step.model in ("a", "b")
    assert step.prefetch == [] and step.evict == []
    # Once the other resident model has nothing queued, the prefetch of "c" may take its slot.
    sched = make_scheduler()
    sched.submit(req("a", RT, 0.0, 1.0))
    sched.submit(req("c", RT, 0.0, 0.19))
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "a" and step.prefetch == ["c"] and step.evict == ["b"]


def test_eviction_by_expected_reuse_versus_lru() -> None:
    victims = {}
    for policy in ("fastptm", "fifo-lru"):
        clock = FakeClock()
        sched = make_scheduler(policy, clock=clock)
        tiers = FakeTiers(slots=2, resident=["a", "b"])
        popular = [req("a", RT, 0.1 * i, 5.0) for i in range(10)]  # "a": often, but not lately
        run(sched, clock, tiers, [*popular, req("b", RT, 2.0, 5.0)])  # "b": once, most recently
        clock.t = 3.0
        sched.submit(req("c", RT, 3.0, 5.0))
        step = sched.schedule(tiers.view())
        assert step is not None and step.model == "c"
        victims[policy] = step.evict
    assert victims == {"fastptm": ["b"], "fifo-lru": ["a"]}


def test_batch_work_fills_a_realtime_step_of_the_same_model() -> None:
    sched = make_scheduler()
    sched.submit(req("a", RT, 0.0, 1.0))
    extra = [req("a", BATCH, 0.0, 30.0) for _ in range(3)]
    for r in extra:
        sched.submit(r)
    step = sched.schedule(FakeTiers(slots=1, resident=["a"]).view())
    assert step is not None and step.kind is StepKind.REALTIME and len(step.batch) == 4
    assert step.batch[0].cls is RT  # real-time first within the batch


def test_batch_steps_are_capped_once_realtime_traffic_exists() -> None:
    sched = make_scheduler()
    tiers = FakeTiers(slots=2, resident=["a", "b"])
    for _ in range(40):
        sched.submit(req("a", BATCH, 0.0, 30.0))  # 40 x 0.01 s + 0.01 s overhead = 0.41 s in one batch
    step = sched.schedule(tiers.view())
    assert step is not None and len(step.batch) == 40  # no real-time traffic yet: nobody to protect
    sched.on_step_done(step, 0.41)
    for _ in range(40):
        sched.submit(req("a", BATCH, 0.0, 30.0))
    sched.submit(req("b", RT, 0.0, 0.5))
    rt_step = sched.schedule(tiers.view())
    assert rt_step is not None and rt_step.model == "b"
    sched.on_step_done(rt_step, 0.02)
    step = sched.schedule(tiers.view())
    assert step is not None and step.kind is StepKind.BATCH
    # Capped at min(batch_step_s = 0.1 s, 0.2 * 0.5 s) as predicted with its error margin: at most 9.
    assert 7 <= len(step.batch) <= 9 and step.estimated_seconds <= 0.1


def test_batch_work_for_a_cold_model_gathers_until_worth_a_switch() -> None:
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    tiers = FakeTiers(slots=1, resident=["a"])  # full: loading "b" would evict "a"
    for _ in range(3):
        sched.submit(req("b", BATCH, 0.0, 30.0))
    step = sched.schedule(tiers.view())
    assert step is not None and step.kind is StepKind.IDLE and not step.batch
    assert sched.wake_at() == pytest.approx(10.0)  # owed after batch_max_wait_s
    for _ in range(5):  # eight queued: worth evicting for
        sched.submit(req("b", BATCH, 0.0, 30.0))
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "b" and step.evict == ["a"] and len(step.batch) == 8
    # Owed work gets its switch even when it is alone.
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    sched.submit(req("b", BATCH, 0.0, 30.0))
    clock.t = 10.0
    step = sched.schedule(tiers.view())
    assert step is not None and step.model == "b" and step.kind is StepKind.FORCED
