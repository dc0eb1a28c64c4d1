"""Calibration of the simulator's device profile through the real engine (``bench trace --calibrate``).

The quiet profile (``trace_real.measure_profile``) times loads and batches alone. Under traffic a step
also pays for the CPU work around its batch: admitting, scheduling and delivering each request, the
serving thread and the load generator sharing the same cores. A short replay at two or three rates
records every step the real engine runs (``StepRecorder``: from the scheduler handing the step out to
the next ``schedule`` call, i.e. compute, report and delivery, less the wait for weights) and fits

    step seconds = a + b x tokens + c x requests

by least squares over the steps that moved no weights (``fit_steps``). ``a`` and ``b`` become the
profile's batch cost, ``c`` its ``request_overhead_s``. ``measure_contention`` times a batch alone and
while another model's weights are copied onto the device: the difference per second of copy is the
profile's ``copy_slowdown``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ptmserve.bench.workload import WorkloadSpec, generate, rate_for_load
from ptmserve.engine.costs import DeviceProfile
from ptmserve.engine.scheduler import Scheduler, Step

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepSample:
    """One step of the real engine, as the calibration sees it."""

    tokens: int
    requests: int
    exec_s: float  # the runner's compute time
    wait_s: float  # time the step waited for its model's weights
    cycle_s: float  # from the step's hand-out to the next ``schedule`` call (compute, report, deliver)
    loaded: bool  # it needed a load of its model
    prefetches: int  # loads it started in the background


@dataclass(frozen=True, slots=True)
class StepFit:
    """``seconds = a + b * tokens + c * requests``, fitted over ``steps`` steps."""

    a: float
    b: float
    c: float
    steps: int
    residual_s: float  # root mean square of the residuals

    def __call__(self, tokens: int, requests: int) -> float:
        return self.a + self.b * tokens + self.c * requests


class StepRecorder:
    """Records a ``StepSample`` per step the scheduler hands out (wraps ``schedule`` and
    ``on_step_done`` on this scheduler instance; the engine's code is unchanged)."""

    def __init__(self, scheduler: Scheduler, clock: Callable[[], float] = time.perf_counter) -> None:
        self.samples: list[StepSample] = []
        self._clock = clock
        self._open: tuple[float, Step] | None = None
        self._measured: tuple[float, float] | None = None
        schedule, done = scheduler.schedule, scheduler.on_step_done

        def timed_schedule(view: object) -> Step | None:
            self._close(self._clock())
            step = schedule(view)  # type: ignore[arg-type]
            if step is not None and step.model is not None:
                self._open, self._measured = (self._clock(), step), None
            return step

        def timed_done(
            step: Step, exec_seconds: float, load_seconds: float = 0.0, *args: object, **kw: object
        ):  # noqa: ANN202
            if self._open is not None and self._open[1] is step:
                self._measured = (exec_seconds, load_seconds)
            return done(step, exec_seconds, load_seconds, *args, **kw)  # type: ignore[arg-type]

        scheduler.schedule = timed_schedule  # type: ignore[method-assign]
        scheduler.on_step_done = timed_done  # type: ignore[method-assign]

    def _close(self, now: float) -> None:
        if self._open is None or self._measured is None:
            return
        start, step = self._open
        exec_s, wait_s = self._measured
        self.samples.append(
            StepSample(
                tokens=step.tokens,
                requests=len(step.batch),
                exec_s=exec_s,
                wait_s=wait_s,
                cycle_s=now - start,
                loaded=step.load_needed,
                prefetches=len(step.prefetch),
            )
        )
        self._open = self._measured = None


def fit_steps(samples: Sequence[StepSample]) -> StepFit:
    """Least squares of ``cycle - wait`` on tokens and requests over the steps that moved no weights.

    Coefficients are never negative: a negative one is fixed at 0 and the others refitted.

    Raises:
        ValueError: fewer than 3 usable steps.
    """
    rows = [
        (float(s.tokens), float(s.requests), s.cycle_s - s.wait_s)
        for s in samples
        if not s.loaded and not s.prefetches and s.requests > 0 and s.cycle_s > 0
    ]
    if len(rows) < 3:
        raise ValueError(f"calibration needs at least 3 steps without loads, got {len(rows)}")
    free = [True, True, True]  # a, b, c
    while True:
        coef = _least_squares(rows, free)
        negative = [i for i in range(3) if free[i] and coef[i] < 0]
        if not negative:
            break
        free[negative[0]] = False
    a, b, c = coef
    rms = math.sqrt(statistics.fmean((y - (a + b * t + c * r)) ** 2 for t, r, y in rows))
    return StepFit(a, b, c, len(rows), rms)


def _least_squares(rows: Sequence[tuple[float, float, float]], free: Sequence[bool]) -> list[float]:
    """Coefficients of ``y ~ 1, tokens, requests`` (only the ``free`` ones; the others are 0)."""
    cols = [i for i in range(3) if free[i]]

    def x(row: tuple[float, float, float], i: int) -> float:
        return 1.0 if i == 0 else row[i - 1]

    n = len(cols)
    m = [
        [sum(x(r, i) * x(r, j) for r in rows) for j in cols] + [sum(x(r, i) * r[2] for r in rows)]
        for i in cols
    ]
    for k in range(n):  # Gaussian elimination with partial pivoting
        p = max(range(k, n), key=lambda i: abs(m[i][k]))
        m[k], m[p] = m[p], m[k]
        if abs(m[k][k]) < 1e-18:
            m[k][k] = 1e-18
        for i in range(k + 1, n):
            f = m[i][k] / m[k][k]
            for j in range(k, n + 1):
                m[i][j] -= f * m[k][j]
    sol = [0.0] * n
    for k in reversed(range(n)):
        sol[k] = (m[k][n] - sum(m[k][j] * sol[j] for j in range(k + 1, n))) / m[k][k]
    out = [0.0, 0.0, 0.0]
    for i, v in zip(cols, sol, strict=True):
        out[i] = v
    return out


def calibrated_profile(
    base: DeviceProfile, fit: StepFit, params: float, slowdown: float | None, notes: str = ""
) -> DeviceProfile:
    """``base`` with the batch cost, per-request cost and copy slowdown of a calibration."""
    b = fit.b if fit.b > 0 else base.token_seconds(round(params * base.bytes_per_param))
    return replace(
        base,
        name="cpu-calibrated",
        batch_overhead_s=fit.a,
        flops=2 * params / b,
        request_overhead_s=fit.c,
        copy_slowdown=slowdown,
        notes=notes,
    )


def calibrate(
    spec: WorkloadSpec,
    base: DeviceProfile,
    args: argparse.Namespace,
    *,
    loads: Sequence[float] = (0.3, 0.6),
    seconds: float = 8.0,
) -> tuple[DeviceProfile, dict[str, object]]:
    """Replay ``seconds`` of ``spec`` at each of ``loads`` (shares of the quiet profile's token rate)
    through the real engine under ``fastptm``, fit the step costs, measure the copy slowdown; return the
    calibrated profile and what was measured."""
    from ptmserve.bench import trace
    from ptmserve.bench.trace_real import measure_contention, model_bytes, open_target

    params = model_bytes() / base.bytes_per_param
    spt = base.token_seconds(int(params * base.bytes_per_param))
    samples: list[StepSample] = []
    runs = []
    device_models = args.device_models or 4
    for load in loads:
        short = replace(spec, duration_s=seconds, seed=spec.seed + 1000 + int(load * 100))
        short = replace(short, rate=rate_for_load(short, load, spt))
        arrivals = generate(short)
        recorders: list[StepRecorder] = []

        def attach(target: object, recorders: list[StepRecorder] = recorders) -> None:
            recorders.append(StepRecorder(target.engine._scheduler))  # type: ignore[attr-defined]  # noqa: SLF001

        result = trace.run_real(open_target, "fastptm", arrivals, short, device_models, args, observe=attach)
        samples += recorders[0].samples
        runs.append(
            {
                "load": load,
                "rate": round(short.mean_rate(), 3),
                "requests": len(arrivals),
                "steps": len(recorders[0].samples),
                "goodput_rps": result["goodput_rps"],
                "timeouts": result["timeouts"],
                "loadgen": result.get("loadgen"),
            }
        )
        print(
            f"calibration: load {load}: {len(arrivals)} requests, {len(recorders[0].samples)} steps",
            flush=True,
        )
    fit = fit_steps(samples)
    contention = measure_contention(spec)
    slowdown = contention["slowdown"]
    notes = (
        f"calibrated through the engine under traffic: step = {fit.a * 1e3:.2f} ms "
        f"+ {fit.b * 1e6:.1f} us/token + {fit.c * 1e3:.3f} ms/request "
        f"({fit.steps} steps, rms {fit.residual_s * 1e3:.2f} ms); "
        f"copy slowdown {slowdown:.2f}; quiet: {base.notes}"
    )
    profile = calibrated_profile(base, fit, params, slowdown, notes)
    details = {
        "runs": runs,
        "fit": {"a_s": fit.a, "b_s_per_token": fit.b, "c_s_per_request": fit.c, "steps": fit.steps,
                "rms_s": fit.residual_s},
        "contention": contention,
        "quiet_profile": base.to_dict(),
    }  # fmt: skip
    return profile, details


def synthetic_samples(
    a: float, b: float, c: float, n: int = 400, noise: float = 0.05, seed: int = 0
) -> list[StepSample]:
    """Steps whose cycle is ``a + b * tokens + c * requests`` times log-normal noise (tests, docs)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        requests = rng.randint(1, 64)
        tokens = sum(rng.randint(4, 128) for _ in range(requests))
        y = (a + b * tokens + c * requests) * math.exp(rng.gauss(0.0, noise))
        out.append(StepSample(tokens, requests, y * 0.8, 0.0, y, False, 0))
    return out
