"""The scheduler contract: requests, queues, expiry, steps and feedback, with a fake clock and runner."""

from __future__ import annotations

import pytest

from ptmserve.engine.requests import (
    ClassDefaults,
    Request,
    RequestClass,
    RequestStatus,
    deadline_from,
    request_class,
)
from ptmserve.engine.scheduler import StepKind
from ptmserve.errors import DeadlineExceeded, InvalidInput, Overloaded
from tests.engine.test_scheduler_support import (
    BATCH,
    RT,
    SIZE,
    FakeClock,
    FakeTiers,
    make_scheduler,
    req,
    run,
)

POLICIES = ["fastptm", "fifo-lru", "edf-lru"]


def test_priority_maps_to_class_with_triton_semantics() -> None:
    assert request_class(1) is RequestClass.REALTIME
    assert request_class(2) is RequestClass.BATCH
    assert request_class(7) is RequestClass.BATCH
    assert request_class(0, RequestClass.BATCH) is RequestClass.BATCH
    assert request_class(0, RequestClass.REALTIME) is RequestClass.REALTIME
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidInput):
            request_class(bad)  # type: ignore[arg-type]


def test_deadline_from_timeout_or_class_default() -> None:
    d = ClassDefaults(realtime_timeout_s=0.5, batch_timeout_s=20.0)
    assert deadline_from(250_000, RT, 10.0, d) == pytest.approx(10.25)
    assert deadline_from(None, RT, 10.0, d) == pytest.approx(10.5)
    assert deadline_from(0, BATCH, 10.0, d) == pytest.approx(30.0)  # 0 means "not given", as in Triton
    with pytest.raises(InvalidInput):
        deadline_from(-5, RT, 0.0, d)


@pytest.mark.parametrize("policy", POLICIES)
def test_full_queue_rejects_with_overloaded(policy: str) -> None:
    sched = make_scheduler(policy, max_queue_per_model_class=2)
    sched.submit(req("a", RT, 0.0, 5.0))
    sched.submit(req("a", RT, 0.0, 5.0))
    with pytest.raises(Overloaded):
        sched.submit(req("a", RT, 0.0, 5.0))
    sched.submit(req("a", BATCH, 0.0, 5.0))  # another class, another queue
    sched.submit(req("b", RT, 0.0, 5.0))  # another model, another queue
    assert sched.pending() == 4


@pytest.mark.parametrize("policy", POLICIES)
def test_submit_refuses_a_deadline_already_passed(policy: str) -> None:
    sched = make_scheduler(policy, clock=FakeClock(3.0))
    with pytest.raises(DeadlineExceeded):
        sched.submit(req("a", RT, 1.0, 1.0))
    assert sched.pending() == 0


def test_fastptm_fails_fast_what_cannot_finish_even_alone() -> None:
    # 500 tokens take 0.51 s even on a resident model: a 0.2 s deadline is hopeless from the start.
    sched = make_scheduler("fastptm")
    sched.submit(req("a", RT, 0.0, 0.2, tokens=500))  # size unknown: only the batch overhead is certain
    sched.register("a", SIZE)
    with pytest.raises(DeadlineExceeded):
        sched.submit(req("a", RT, 0.0, 0.2, tokens=500))
    baseline = make_scheduler("fifo-lru")
    baseline.register("a", SIZE)
    baseline.submit(req("a", RT, 0.0, 0.2, tokens=500))  # the peers' rule accepts it


@pytest.mark.parametrize("policy", ["fastptm", "edf-lru"])
def test_deadline_order_within_a_class(policy: str) -> None:
    clock = FakeClock()
    sched = make_scheduler(policy, clock=clock, max_batch_requests=1)
    timeouts = [5.0, 2.0, 9.0, 1.0, 3.0]
    reqs = [req("a", RT, 0.0, t) for t in timeouts]
    steps = run(sched, clock, FakeTiers(slots=1, resident=["a"]), reqs)
    served = [s.batch[0].deadline for s in steps if s.batch]
    assert served == sorted(timeouts)


def test_fifo_serves_in_arrival_order() -> None:
    clock = FakeClock()
    sched = make_scheduler("fifo-lru", clock=clock, max_batch_requests=1)
    reqs = [req("a", RT, 0.0, t) for t in (5.0, 2.0, 9.0)]
    steps = run(sched, clock, FakeTiers(slots=1, resident=["a"]), reqs)
    assert [s.batch[0].id for s in steps] == [r.id for r in reqs]


@pytest.mark.parametrize("policy", POLICIES)
def test_expired_requests_fail_as_timeouts_and_never_run(policy: str) -> None:
    clock = FakeClock()
    sched = make_scheduler(policy, clock=clock, max_batch_requests=1)
    # Each request takes 0.11 s; the 0.25 s deadlines cannot all be met one at a time.
    reqs = [req("a", RT, 0.0, 0.25, tokens=100) for _ in range(4)]
    steps = run(sched, clock, FakeTiers(slots=1, resident=["a"]), reqs)
    ran = [r.id for s in steps for r in s.batch]
    expired = [r.id for s in steps for r in s.expired]
    assert sorted(ran + expired) == sorted(r.id for r in reqs)  # each exactly once
    assert not set(ran) & set(expired)
    for s in steps:  # nothing starts after its deadline, whatever the policy
        assert all(r.deadline > s.started for r in s.batch)
    if policy == "fastptm":  # predictive: nothing it runs ends late
        assert len(expired) == 2
        for s in steps:
            assert all(r.deadline >= s.started + s.estimated_seconds - 1e-9 for r in s.batch)
    else:  # the peers' rule: the third starts in time (0.22 s) and ends late; the fourth has expired
        assert len(expired) == 1


def test_cancel_frees_the_queue_slot_at_once_and_stops_a_running_request() -> None:
    sched = make_scheduler(max_queue_per_model_class=2)
    r1, r2 = req("a", RT, 0.0, 5.0), req("a", RT, 0.0, 5.0)
    sched.submit(r1)
    sched.submit(r2)
    assert sched.cancel(r1.id) is r1 and r1.status is RequestStatus.CANCELLED
    assert sched.cancel(r1.id) is None
    sched.submit(req("a", RT, 0.0, 5.0))  # the cancelled request's slot is free again
    step = sched.schedule(FakeTiers(slots=1, resident=["a"]).view())
    assert step is not None and step.batch[0] is r2 and r2.status is RequestStatus.RUNNING
    assert r2.id in sched.running
    assert sched.cancel(r2.id) is r2  # running: it will not be continued or delivered
    assert r2 not in sched.on_step_done(step, 0.01)
    assert r2.status is RequestStatus.CANCELLED and r2.id not in sched.running


def test_a_model_with_groups_on_the_host_is_predicted_from_all_its_weights() -> None:
    sched = make_scheduler()
    sched.register("placed", 1_000_000, compute_bytes=4_000_000)
    sched.register("full", 4_000_000)
    assert sched.costs.exec_seconds("placed", 100, 1_000_000) == sched.costs.exec_seconds(
        "full", 100, 4_000_000
    )


def test_the_cost_model_learns_from_the_tokens_really_computed() -> None:
    sched = make_scheduler()
    seen: list[int] = []
    observe = sched.costs.observe_exec
    sched.costs.observe_exec = lambda model, tokens, *a, **k: (
        seen.append(tokens),
        observe(model, tokens, *a, **k),
    )
    for _ in range(3):
        sched.submit(req("a", RT, 0.0, 5.0, tokens=10))
    step = sched.schedule(FakeTiers(slots=1, resident=["a"]).view())
    assert step is not None and step.tokens == 30
    sched.cancel(step.batch[0].id)  # before the runner computed it: the runner skipped it
    sched.on_step_done(step, 0.01, tokens=20)
    assert seen == [20]
    for _ in range(2):
        sched.submit(req("a", RT, 0.0, 5.0, tokens=10))
    step = sched.schedule(FakeTiers(slots=1, resident=["a"]).view())
    for r in step.batch:
        sched.cancel(r.id)
    sched.on_step_done(step, 0.0, tokens=0)  # nothing computed: nothing learned
    assert seen == [20]


def test_a_request_over_the_token_limit_runs_a_part_per_step_and_others_run_between() -> None:
    clock = FakeClock()
    sched = make_scheduler("edf-lru", clock=clock, max_batch_tokens=100)
    big = Request(900_001, "a", BATCH, 0.0, 100.0, 250, inputs=(60, 60, 60, 70))
    sched.submit(big)
    tiers = FakeTiers(slots=2, resident=["a", "b"])
    step = sched.schedule(tiers.view())
    assert step.batch == [big] and step.spans[big.id] == (0, 1) and step.tokens == 60
    assert sched.on_step_done(step, 0.01) == []  # back in its queue, still running
    assert big.status is RequestStatus.RUNNING and big.done_inputs == 1 and big.tokens == 190
    small = req("b", RT, 0.0, 5.0)
    sched.submit(small)
    step = sched.schedule(tiers.view())
    assert step.batch == [small]  # real-time work of another model runs between the parts
    assert sched.on_step_done(step, 0.01) == [small] and small.status is RequestStatus.FINISHED
    spans = []
    while sched.pending():
        step = sched.schedule(tiers.view())
        spans.append(step.spans[big.id])
        done = sched.on_step_done(step, 0.01)
    assert spans == [(1, 2), (2, 3), (3, 4)] and done == [big]
    assert big.status is RequestStatus.FINISHED and not sched.running


def test_expire_takes_late_queued_requests_out_at_once() -> None:
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    early, late = req("a", RT, 0.0, 0.2), req("a", RT, 0.0, 5.0)
    sched.submit(early)
    sched.submit(late)
    assert sched.next_deadline() == pytest.approx(0.2)
    assert sched.expire() == []
    clock.t = 0.25
    assert sched.expire() == [early] and early.status is RequestStatus.TIMED_OUT
    assert sched.pending() == 1 and sched.next_deadline() == pytest.approx(5.0)


def test_drop_fails_the_queued_requests_of_one_model() -> None:
    sched = make_scheduler()
    a, b = req("a", RT, 0.0, 5.0), req("b", BATCH, 0.0, 5.0)
    sched.submit(a)
    sched.submit(b)
    assert sched.drop("a") == [a] and a.status is RequestStatus.FAILED
    assert sched.pending() == 1
    assert sched.drop() == [b]


def test_one_step_at_a_time() -> None:
    sched = make_scheduler()
    sched.submit(req("a", RT, 0.0, 5.0))
    sched.submit(req("b", RT, 0.0, 5.0))
    tiers = FakeTiers(slots=2, resident=["a", "b"])
    step = sched.schedule(tiers.view())
    assert step is not None
    with pytest.raises(RuntimeError):
        sched.schedule(tiers.view())
    sched.on_step_done(step, 0.02)
    assert sched.schedule(tiers.view()) is not None


def test_nothing_queued_gives_none_and_idle_steps_need_no_report() -> None:
    sched = make_scheduler()
    assert sched.schedule(FakeTiers(slots=1).view()) is None
    # Both slots busy: the cold model cannot get room, so the step only carries what expired.
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    sched.submit(req("c", RT, 0.0, 5.0))
    tiers = FakeTiers(slots=2, resident=["a", "b"], busy={"a", "b"})
    step = sched.schedule(tiers.view())
    assert step is not None and step.model is None and step.kind is StepKind.IDLE and not step.batch
    sched.on_step_done(step, 0.0)  # allowed, does nothing
    assert sched.pending() == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_never_picks_a_model_with_work_in_flight(policy: str) -> None:
    for busy in ({"a"}, {"b"}):
        sched = make_scheduler(policy)
        sched.submit(req("c", RT, 0.0, 5.0))
        tiers = FakeTiers(slots=2, resident=["a", "b"], busy=busy)
        step = sched.schedule(tiers.view())
        assert step is not None and step.model == "c" and step.load_needed
        assert step.evict and not set(step.evict) & busy
        assert not set(step.prefetch) & set(step.evict)


def test_load_feedback_refines_the_cost_model() -> None:
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    sched.submit(req("a", RT, 0.0, 5.0, tokens=100))
    step = sched.schedule(FakeTiers(slots=1).view())
    assert step is not None and step.load_needed
    assert step.estimated_seconds == pytest.approx(0.1 + 0.01 + 0.1)
    clock.t = 0.5
    # The device is twice as slow as its profile says: predictions follow the measurements.
    sched.on_step_done(step, exec_seconds=0.22, load_seconds=0.2, loaded_bytes=SIZE)
    bandwidth = 1e9 + 0.2 * (SIZE / 0.2 - 1e9)  # an EWMA (weight 0.2) of the measured bytes/s
    assert sched.costs.load_seconds(SIZE) == pytest.approx(SIZE / bandwidth, rel=1e-6)
    for tokens in (10, 50, 200, 400) * 5:
        sched.costs.observe_exec("a", tokens, 0.02 + 0.002 * tokens, SIZE)
    assert sched.costs.exec_seconds("a", 300, SIZE) == pytest.approx(0.02 + 0.6, rel=0.05)
