"""The simulator runs the real scheduler on virtual time; the standard workload; the trace benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections import Counter
from dataclasses import replace

import pytest

from ptmserve.bench import trace
from ptmserve.bench.workload import WorkloadSpec, generate, rate_for_load
from ptmserve.engine.costs import CostModel
from ptmserve.engine.policies import make_policy
from ptmserve.engine.requests import ClassDefaults, Outcome, RequestClass
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits
from ptmserve.engine.simulator import Arrival, SimClock, SimConfig, SimResult, simulate
from ptmserve.errors import DeadlineExceeded, Overloaded
from tests.engine.test_scheduler_support import PROFILE, SIZE

POLICIES = ["fastptm", "fifo-lru", "edf-lru", "fifo-naive"]


def _sim(policy: str, arrivals: list[Arrival], models: int, slots: int, **kw: object) -> SimResult:
    limits = SchedulerLimits(max_queue_per_model_class=int(kw.pop("queue", 20)))  # type: ignore[call-overload]
    config = SimConfig(
        sizes={f"m{i}": SIZE for i in range(models)},
        device_budget=slots * SIZE,
        truth=kw.pop("truth", PROFILE),  # type: ignore[arg-type]
        defaults=ClassDefaults(realtime_timeout_s=0.5, batch_timeout_s=10.0),
        **kw,  # type: ignore[arg-type]
    )
    clock = SimClock()
    return simulate(
        arrivals, Scheduler(make_policy(policy), CostModel(PROFILE), limits, clock), clock, config
    )


def _random_trace(seed: int, n: int, models: int, rate: float) -> list[Arrival]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prio = rng.choice([0, 1, 2])
        timeout = rng.choice([None, 0, 200_000, 2_000_000])
        out.append(Arrival(t, f"m{rng.randrange(models)}", rng.randint(1, 120), prio, timeout))
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_ends_in_exactly_one_outcome_within_budget(policy: str) -> None:
    arrivals = _random_trace(seed=1, n=3000, models=12, rate=40.0)  # overloaded: every outcome shows up
    result = _sim(policy, arrivals, models=12, slots=3, exec_noise=0.2, queue=3)
    assert len(result.records) == len(arrivals)
    outcomes = Counter(r.outcome for r in result.records)
    assert None not in outcomes and sum(outcomes.values()) == len(arrivals)
    assert outcomes[Outcome.SUCCESS] > 0 and outcomes[Outcome.TIMEOUT] > 0 and outcomes[Outcome.REJECTED] > 0
    assert result.max_device_bytes <= 3 * SIZE
    assert result.loads == sum(result.loads_per_model.values()) and result.loads >= 12
    for r in result.records:
        if r.outcome is Outcome.SUCCESS:
            assert r.finish is not None and r.started is not None and r.finish <= r.deadline
        elif r.outcome is Outcome.TIMEOUT and r.started is not None:
            assert r.finish is not None and r.finish > r.deadline  # ran, but ended late


@pytest.mark.parametrize("cls_priority", [1, 2])
def test_one_model_without_binding_deadlines_every_batching_policy_gives_the_same_result(
    cls_priority: int,
) -> None:
    rng = random.Random(7)
    arrivals, t = [], 0.0
    for _ in range(400):
        t += rng.expovariate(30.0)
        arrivals.append(Arrival(t, "m0", rng.randint(1, 60), cls_priority, 3_600_000_000))
    results = {
        p: _sim(p, arrivals, models=1, slots=1) for p in POLICIES if p != "fifo-naive"
    }  # it batches nothing
    fates = {p: [(r.outcome, r.started, r.finish) for r in res.records] for p, res in results.items()}
    assert fates["fastptm"] == fates["fifo-lru"] == fates["edf-lru"]
    assert all(o is Outcome.SUCCESS for o, _, _ in fates["fastptm"])
    assert {res.steps for res in results.values()} == {results["fifo-lru"].steps}


def test_simulation_is_deterministic_and_learns_a_slower_device() -> None:
    arrivals = _random_trace(seed=3, n=1500, models=6, rate=15.0)
    slow = replace(PROFILE, flops=PROFILE.flops / 2, batch_overhead_s=0.02)  # twice as slow as predicted
    first = _sim("fastptm", arrivals, models=6, slots=2, truth=slow, exec_noise=0.1, seed=5)
    again = _sim("fastptm", arrivals, models=6, slots=2, truth=slow, exec_noise=0.1, seed=5)
    assert [(r.outcome, r.finish) for r in first.records] == [(r.outcome, r.finish) for r in again.records]
    late = [r for r in first.records if r.outcome is Outcome.TIMEOUT and r.started is not None]
    ran = [r for r in first.records if r.started is not None]
    assert len(late) < 0.03 * len(ran)  # predictions follow the measured device after a few steps


def test_fastptm_beats_fifo_on_a_multi_model_trace() -> None:
    spec = WorkloadSpec(models=12, duration_s=120.0, realtime_timeout_ms=500.0, burst_rate=5.0, seed=2)
    spec = replace(spec, rate=rate_for_load(spec, 0.5, PROFILE.token_seconds(SIZE)))
    arrivals = generate(spec)
    config = SimConfig(
        sizes=dict.fromkeys(spec.model_names(), SIZE),
        device_budget=3 * SIZE,
        truth=PROFILE,
        defaults=ClassDefaults(realtime_timeout_s=0.5, batch_timeout_s=30.0),
    )
    out = {}
    for policy in ("fastptm", "fifo-lru"):
        clock = SimClock()
        sched = Scheduler(make_policy(policy), CostModel(PROFILE), SchedulerLimits(), clock)
        out[policy] = simulate(arrivals, sched, clock, config)
    timeouts = {p: sum(r.outcome is Outcome.TIMEOUT for r in res.records) for p, res in out.items()}
    assert timeouts["fastptm"] * 3 < timeouts["fifo-lru"]
    success = {p: sum(r.outcome is Outcome.SUCCESS for r in res.records) for p, res in out.items()}
    assert success["fastptm"] > success["fifo-lru"]
    assert out["fastptm"].prefetches > 0 and out["fifo-lru"].prefetches == 0


def test_workload_is_seeded_zipf_with_bursts_and_a_class_mix() -> None:
    spec = WorkloadSpec(models=10, duration_s=200.0, rate=50.0, burst_rate=20.0, burst_every_s=20.0, seed=4)
    trace_a, trace_b = generate(spec), generate(spec)
    assert trace_a == trace_b and trace_a != generate(replace(spec, seed=5))
    assert all(x.time <= y.time for x, y in zip(trace_a, trace_a[1:], strict=False))
    per_model = Counter(a.model for a in trace_a)
    names = spec.model_names()
    assert per_model[names[0]] > per_model[names[1]] > per_model[names[4]]
    realtime = sum(a.priority == 1 for a in trace_a) / len(trace_a)
    assert abs(realtime - spec.realtime_share) < 0.05
    assert all(spec.tokens_min <= a.tokens <= spec.tokens_max for a in trace_a)
    assert {a.timeout_us for a in trace_a} == {500_000, 30_000_000}
    assert abs(len(trace_a) / spec.duration_s - spec.mean_rate()) < 0.25 * spec.mean_rate()
    quiet = replace(spec, burst_rate=0.0)
    woken = Counter(a.model for a in trace_a) - Counter(a.model for a in generate(quiet))
    assert woken and all(names.index(m) >= spec.models // 2 for m, n in woken.items() if n > 30)


def test_trace_bench_sim_runs_every_policy_and_reports_ratios() -> None:
    parser = argparse.ArgumentParser()
    trace.add_arguments(parser)
    args = parser.parse_args(["--models", "8", "--device-models", "2", "--duration", "30", "--load", "0.5"])
    report = trace.run(args)
    saved = json.loads(json.dumps(report))  # what --json writes
    assert saved["policies"].keys() == set(POLICIES) == report["policies"].keys()
    for r in saved["policies"].values():
        assert sum(r["outcomes"].values()) == saved["requests"]
        assert r["switches"] == r["loads"] > 0 and set(r["classes"]) == {"realtime", "batch"}
    assert set(saved["vs_fifo_lru"]["fastptm"]) == {"switches_fewer", "timeouts_fewer", "goodput_gain"}


def test_p99_counts_failures_as_infinitely_late() -> None:
    from ptmserve.engine.simulator import Record

    records = [Record(i, "m", RequestClass.REALTIME, 0.0, 1.0, Outcome.SUCCESS, 0.1) for i in range(98)]
    records += [Record(98 + i, "m", RequestClass.REALTIME, 0.0, 1.0, Outcome.TIMEOUT, 1.0) for i in range(2)]
    rt = trace.summarize(records, 10.0, {"loads": 0})["classes"]["realtime"]  # type: ignore[index]
    assert rt["p50_s"] == pytest.approx(0.1) and rt["p99_s"] is None and rt["success_p99_s"] == 0.1
    records = records[:99] + [Record(99, "m", RequestClass.REALTIME, 0.0, 1.0, Outcome.SUCCESS, 0.2)]
    rt = trace.summarize(records, 10.0, {"loads": 0})["classes"]["realtime"]  # type: ignore[index]
    assert rt["p99_s"] == pytest.approx(0.2)  # 1 miss in 100: p99 is the slowest success


def test_real_mode_replay_seam_maps_errors_to_outcomes() -> None:
    class FakeEngine:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int, int, int | None]] = []

        async def submit(self, model: str, tokens: int, priority: int, timeout_us: int | None) -> None:
            self.calls.append((model, tokens, priority, timeout_us))
            if model == "slow":
                raise DeadlineExceeded("late")
            if model == "full":
                raise Overloaded("full")
            if model == "bad":
                raise RuntimeError("boom")

    arrivals = [Arrival(0.0, m, 5, 1, 100_000_000) for m in ("ok", "slow", "full", "bad")]
    engine = FakeEngine()
    records = asyncio.run(trace.replay(arrivals, engine))
    assert [r.outcome for r in records] == [Outcome.SUCCESS, Outcome.TIMEOUT, Outcome.REJECTED, Outcome.ERROR]
    assert engine.calls[0] == ("ok", 5, 1, 100_000_000)
