"""Capacity (issue 13): the bisection, the calibration fit, the simulator's per-request cost, and the
load generator's own process."""

from __future__ import annotations

import asyncio
import time

import pytest

from ptmserve.bench.trace_calibrate import StepSample, fit_steps, synthetic_samples
from ptmserve.bench.trace_capacity import Probe, at_rate, meets, search
from ptmserve.bench.trace_loadgen import LoadGenerator
from ptmserve.bench.workload import WorkloadSpec
from ptmserve.engine.costs import CostModel, DeviceProfile
from ptmserve.engine.policies import make_policy
from ptmserve.engine.requests import ClassDefaults, Outcome
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits
from ptmserve.engine.simulator import Arrival, SimClock, SimConfig, simulate
from ptmserve.errors import DeadlineExceeded, Overloaded

# -- the search ------------------------------------------------------------------------------------------


def _boundary(true_capacity: float) -> tuple[list[float], object]:
    seen: list[float] = []

    def probe(rate: float) -> Probe:
        seen.append(rate)
        ok = rate <= true_capacity
        return Probe(rate, ok, 1.0 if ok else 0.5, 1.0)

    return seen, probe


@pytest.mark.parametrize("capacity", [0.7, 13.0, 99.9, 200.0])
@pytest.mark.parametrize("start", [1.0, 50.0])
def test_search_finds_the_boundary_within_tolerance(capacity: float, start: float) -> None:
    seen, probe = _boundary(capacity)
    found = search(probe, start, rel_tol=0.01, max_probes=40)  # type: ignore[arg-type]
    assert found.capacity <= capacity < found.upper  # type: ignore[operator]
    assert found.upper - found.capacity <= 0.01 * found.upper  # type: ignore[operator]
    assert len(found.probes) == len(seen) <= 40
    passed = [p.rate for p in found.probes if p.ok]
    failed = [p.rate for p in found.probes if not p.ok]
    assert max(passed) < min(failed)  # consistent with a monotone boundary


def test_search_respects_its_probe_budget() -> None:
    _, probe = _boundary(37.0)
    found = search(probe, 10.0, rel_tol=1e-6, max_probes=5, growth=1.5)  # type: ignore[arg-type]
    assert len(found.probes) == 5 and found.capacity <= 37.0 < found.upper  # type: ignore[operator]


def test_search_reports_all_fail_and_all_pass() -> None:
    _, never = _boundary(-1.0)
    found = search(never, 10.0, growth=2.0, min_rate=1.0)  # type: ignore[arg-type]
    assert found.capacity == 0.0 and found.upper == 1.0 and not any(p.ok for p in found.probes)
    _, always = _boundary(float("inf"))
    found = search(always, 10.0, growth=2.0, max_rate=100.0)  # type: ignore[arg-type]
    assert found.capacity == 100.0 and found.upper is None and all(p.ok for p in found.probes)


def test_attainment_thresholds_and_rate_scaling() -> None:
    def summary(rt_ok: int, batch_ok: int) -> dict[str, object]:
        return {"classes": {"realtime": {"requests": 100, "success": rt_ok},
                            "batch": {"requests": 100, "success": batch_ok}}}  # fmt: skip

    assert meets(summary(99, 95)) and not meets(summary(98, 100)) and not meets(summary(100, 94))
    spec = WorkloadSpec(rate=20.0, burst_rate=10.0)
    scaled = at_rate(spec, 3 * spec.mean_rate())
    assert scaled.mean_rate() == pytest.approx(3 * spec.mean_rate())
    assert scaled.burst_rate / scaled.rate == pytest.approx(spec.burst_rate / spec.rate)  # the same shape


# -- the calibration -------------------------------------------------------------------------------------


def test_calibration_recovers_known_step_and_request_costs() -> None:
    a, b, c = 0.008, 160e-6, 0.0012
    fit = fit_steps(synthetic_samples(a, b, c, n=600, noise=0.03))
    assert fit.c == pytest.approx(c, rel=0.15)
    assert fit.b == pytest.approx(b, rel=0.05)
    assert fit.a == pytest.approx(a, rel=0.25)


def test_calibration_ignores_steps_that_moved_weights_and_never_goes_negative() -> None:
    clean = synthetic_samples(0.005, 100e-6, 0.0, n=300, noise=0.01)
    polluted = [StepSample(s.tokens, s.requests, s.exec_s, 0.0, s.cycle_s + 1.0, True, 0) for s in clean[:50]]
    fit = fit_steps(clean + polluted)
    assert fit.steps == 300 and fit.c >= 0 and fit.b == pytest.approx(100e-6, rel=0.05)
    with pytest.raises(ValueError):
        fit_steps(polluted)


# -- the simulator charges the per-request cost ----------------------------------------------------------


def _busy(request_cost: float, arrivals: list[Arrival]) -> tuple[float, list[float]]:
    profile = DeviceProfile(request_overhead_s=request_cost, step_overhead_s=0.0)
    config = SimConfig(sizes={"m": 1000}, device_budget=2000, truth=profile, warm=("m",),
                       defaults=ClassDefaults(realtime_timeout_s=5.0, batch_timeout_s=50.0))  # fmt: skip
    clock = SimClock()
    scheduler = Scheduler(make_policy("fastptm"), CostModel(profile), SchedulerLimits(), clock)
    result = simulate(arrivals, scheduler, clock, config)
    assert all(r.outcome is Outcome.SUCCESS for r in result.records)
    return result.busy_seconds, [r.finish - r.arrival for r in result.records]  # type: ignore[operator]


def test_the_simulator_charges_the_per_request_cost_to_each_step() -> None:
    c = 0.004
    spaced = [Arrival(float(i), "m", 20, 1, None) for i in range(10)]  # one request per step
    together = [Arrival(0.0, "m", 20, 1, None) for _ in range(6)]  # one step of six
    for arrivals, per_step in ((spaced, 1), (together, 6)):
        busy0, lat0 = _busy(0.0, arrivals)
        busy1, lat1 = _busy(c, arrivals)
        assert busy1 - busy0 == pytest.approx(c * len(arrivals), rel=1e-6)
        assert [y - x for x, y in zip(lat0, lat1, strict=True)] == pytest.approx(
            [c * per_step] * len(arrivals)
        )


# -- the load generator ----------------------------------------------------------------------------------


class _Target:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str, int, int, int | None]] = []
        self.t0 = 0.0

    async def submit(self, model: str, tokens: int, priority: int, timeout_us: int | None) -> None:
        self.calls.append((time.monotonic() - self.t0, model, tokens, priority, timeout_us))
        if model == "late":
            await asyncio.sleep(0.15)  # delivered after its 50 ms deadline: the client counts a timeout
        elif model == "expired":
            raise DeadlineExceeded("late")
        elif model == "full":
            raise Overloaded("full")
        elif model == "bad":
            raise RuntimeError("boom")
        else:
            await asyncio.sleep(0.02)


def test_the_load_generator_process_sends_at_the_arrival_times_and_reports_outcomes() -> None:
    models = ["ok", "late", "expired", "full", "bad", "ok"]
    arrivals = [Arrival(0.05 + 0.06 * i, m, 10 + i, 1, 50_000) for i, m in enumerate(models)]
    generator = LoadGenerator(arrivals)
    target = _Target()

    async def main():  # noqa: ANN202
        target.t0 = time.monotonic()
        return await generator.serve(target)

    report = asyncio.run(main())
    assert [c[1:] for c in target.calls] == [(a.model, a.tokens, 1, 50_000) for a in arrivals]
    for call, a in zip(target.calls, arrivals, strict=True):  # sent at its time (a spawn child's jitter)
        assert call[0] == pytest.approx(a.time, abs=0.05)
    assert [r.outcome for r in report.records] == [
        Outcome.SUCCESS, Outcome.TIMEOUT, Outcome.TIMEOUT, Outcome.REJECTED, Outcome.ERROR, Outcome.SUCCESS,
    ]  # fmt: skip
    ok = report.records[0]
    assert ok.arrival == pytest.approx(0.05, abs=0.05) and 0.015 < ok.finish - ok.arrival < 0.1  # type: ignore[operator]
    assert report.cpu_seconds >= 0 and report.send_lag_max_s < 0.05 and not generator.process.is_alive()


def test_the_step_recorder_times_each_step_from_hand_out_to_the_next_schedule() -> None:
    from ptmserve.bench.trace_calibrate import StepRecorder
    from tests.engine.test_scheduler_support import RT, FakeTiers, make_scheduler, req

    scheduler = make_scheduler()
    ticks = iter([0.0, 1.0, 1.5, 2.0, 9.0])  # schedule: called, returns; next schedule: called, ...
    recorder = StepRecorder(scheduler, clock=lambda: next(ticks))
    tiers = FakeTiers(slots=2, resident=["a"])
    for _ in range(3):
        scheduler.submit(req("a", RT, 0.0, 100.0, tokens=7))
    step = scheduler.schedule(tiers.view())
    assert step is not None and step.model == "a" and len(step.batch) == 3
    scheduler.on_step_done(step, 0.25, 0.0)
    scheduler.schedule(tiers.view())  # nothing left: the step's cycle ends here
    assert recorder.samples == [StepSample(21, 3, 0.25, 0.0, 0.5, False, 0)]


def test_probe_traces_carry_their_share_of_bursts_at_every_rate() -> None:
    from ptmserve.bench.workload import generate

    spec = WorkloadSpec(duration_s=20.0, rate=20.0, burst_rate=100.0)
    counts = [len(generate(at_rate(spec, r), even_bursts=True)) for r in (20, 30, 40, 50)]
    assert counts == sorted(counts)  # more offered, more sent: no probe is lucky
    for r in (20, 50):
        n = len(generate(at_rate(spec, r), even_bursts=True))
        assert n == pytest.approx(r * spec.duration_s, rel=0.15)
