"""``ptmserve bench trace``: every scheduling policy on the same seeded multi-model trace, in one run.

``--mode sim`` plays the trace through the real ``Scheduler`` on the simulator (``ptmserve.engine.simulator``)
with a device profile (measured on this machine, a named preset, or a JSON file). ``--mode real`` replays it
in real time against the real engine through ``EngineTarget`` (the engine side lives in
``ptmserve.bench.trace_real.open_target``), from a load-generator process (``trace_loadgen``).
``--capacity`` searches each policy's capacity instead (``trace_capacity``); ``--calibrate yes`` fits the
twin's profile under traffic first (``trace_calibrate``). The tables are ``trace_report``'s.

For each policy it reports goodput (requests completed within their deadline per second of trace),
outcomes, switches (loads onto the device, prefetches included), bytes loaded, and p50/p99 latency per
class, where a request that did not succeed counts as infinitely late (so p99 is finite only when at least
99% of the class succeeded). Then the ratios against ``fifo-lru`` and the issue's targets.

``--placement device,host-embeddings,auto`` runs every policy once per placement (issue 12) on the same
trace and the same device budget in bytes: each model takes its device bytes **as placed**, so more models
fit the budget; the compute time of a batch is the same whichever tier its groups' weights are in. The
first placement fills the report's top-level figures; ``placements`` holds each one's, and
``placement_vs_first`` the ratios to the first. In sim mode the placed bytes are the share of a
MiniLM-shaped model's bytes that the placement leaves on the device (measured on one such model, under
``auto`` with a quick profile; ``--host-share`` overrides it), applied to ``--model-bytes``; in real mode
they are what the engine's weight manager places (``EngineSettings(placement=...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Protocol

from ptmserve.bench.trace_report import (  # noqa: F401 - re-exported: the report's helpers lived here
    TARGETS,
    _agreement,
    _pct_diff,
    _placement_line,
    _placement_ratios,
    _ratios,
    format_placements,
    format_table,
    summarize,
)
from ptmserve.bench.workload import WorkloadSpec, generate, rate_for_load
from ptmserve.engine.costs import PROFILES, CostModel, DeviceProfile
from ptmserve.engine.policies import PolicyName, make_policy
from ptmserve.engine.requests import ClassDefaults, Outcome, deadline_from, request_class
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits
from ptmserve.engine.simulator import Arrival, Record, SimClock, SimConfig, simulate
from ptmserve.errors import DeadlineExceeded, InvalidInput, Overloaded
from ptmserve.memory.placement import DEVICE, PLACEMENTS

logger = logging.getLogger(__name__)

MINILM_BYTES = 90_852_864  # all-MiniLM-L6-v2 fp32 weights
POLICIES = [p.value for p in PolicyName]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ptmserve bench trace``."""
    d = WorkloadSpec()
    p = parser
    p.add_argument(
        "--mode",
        choices=("sim", "real", "ray"),
        default="sim",
        help="simulate, drive the real engine, or drive engine replicas on Ray Serve under ptmserve's "
        "router and Ray's default one (trace_ray.py)",
    )
    p.add_argument("--replicas", type=int, default=2, help="ray mode: engine replicas (%(default)s)")
    p.add_argument(
        "--weights",
        default="fp",
        choices=("fp", "int8", "int4"),
        help="real and ray modes: the trace models' weight format, under the same device budget in bytes "
        "(that of --device-models bf16 models), so smaller weights fit more models (%(default)s)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    p.add_argument("--models", type=int, help="models in the trace (default: 16 real, 100 sim)")
    p.add_argument("--device-models", type=int, help="device budget in models (default: 4 real, 16 sim)")
    p.add_argument("--model-bytes", type=int, default=MINILM_BYTES, help="weight bytes per model (MiniLM-L6)")
    p.add_argument("--duration", type=float, help="trace seconds (default: 120 real, 3600 sim)")
    p.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="share of the device's time the trace's tokens alone need, bursts included; batch overheads "
        "and switches come on top (%(default)s)",
    )
    p.add_argument("--rate", type=float, help="background requests/s (overrides --load)")
    p.add_argument("--zipf", type=float, default=d.zipf_s, help="Zipf exponent of popularity (%(default)s)")
    p.add_argument("--realtime-share", type=float, default=d.realtime_share, help="(%(default)s)")
    p.add_argument("--realtime-timeout-ms", type=float, default=d.realtime_timeout_ms, help="(%(default)s)")
    p.add_argument("--batch-timeout-ms", type=float, default=d.batch_timeout_ms, help="(%(default)s)")
    p.add_argument("--burst-every", type=float, default=d.burst_every_s, help="mean seconds between bursts")
    p.add_argument("--burst-seconds", type=float, default=d.burst_s, help="(%(default)s)")
    p.add_argument("--burst-load", type=float, default=0.3, help="a burst's extra compute / device compute")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--profile",
        help=f"device profile: measure (through the engine; the default in real mode), {', '.join(PROFILES)} "
        "(the default in sim mode) or a JSON file",
    )
    p.add_argument(
        "--exec-noise", type=float, default=0.1, help="sim: sigma of log-normal noise on batch times"
    )
    p.add_argument("--max-batch-requests", type=int, default=SchedulerLimits().max_batch_requests)
    p.add_argument("--max-batch-tokens", type=int, default=SchedulerLimits().max_batch_tokens)
    p.add_argument(
        "--predictive-baselines",
        action="store_true",
        help="ablation: give the baselines fastptm's predictive expiry instead of the peers' timeout rule",
    )
    p.add_argument(
        "--placement",
        default=DEVICE,
        help=f"comma-separated placements to run every policy under, on the same trace and device budget "
        f"({', '.join(PLACEMENTS)}); the first fills the top-level figures (default: %(default)s)",
    )
    p.add_argument(
        "--capacity",
        action="store_true",
        help="search each policy's capacity (the highest offered rate at which >= 99%% of real-time and >= "
        "95%% of batch requests meet their deadlines); real mode also calibrates and runs the sim-vs-real "
        "agreement (trace_capacity.py)",
    )
    p.add_argument(
        "--probe-seconds",
        type=float,
        help="--capacity: trace seconds per probe (default: 20 real, 600 sim)",
    )
    p.add_argument(
        "--probes", type=int, help="--capacity: probes per policy at most (default: 5 real, 16 sim)"
    )
    p.add_argument(
        "--calibrate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="real mode: fit the per-request cost and copy slowdown through the engine before the runs "
        "(auto: with --capacity)",
    )
    p.add_argument(
        "--loadgen",
        choices=("process", "inline"),
        default="process",
        help="real mode: replay from a process of its own (default), or from the bench's event loop",
    )
    p.add_argument(
        "--host-share",
        type=float,
        help="sim: share of a model's bytes that host-embeddings and auto leave in the host tier "
        "(default: measured on the MiniLM-shaped trace model)",
    )


def build_trace(args: argparse.Namespace) -> tuple[WorkloadSpec, DeviceProfile, list[Arrival]]:
    """The workload spec, device profile and trace that ``args`` describe."""
    real = args.mode == "real"
    spec = WorkloadSpec(
        models=args.models or (16 if real else 100),
        duration_s=args.duration or (120.0 if real else 3600.0),
        zipf_s=args.zipf,
        realtime_share=args.realtime_share,
        realtime_timeout_ms=args.realtime_timeout_ms,
        batch_timeout_ms=args.batch_timeout_ms,
        burst_every_s=args.burst_every,
        burst_s=args.burst_seconds,
        seed=args.seed,
    )
    profile_name = args.profile or ("measure" if real else "cpu-2core")
    if real:
        from ptmserve.bench.trace_real import model_bytes

        args.model_bytes = model_bytes()  # the models as they sit on the device (bf16), whatever the profile
    if profile_name == "measure":
        from ptmserve.bench.trace_real import measure_profile

        profile = measure_profile(spec)
        logger.info("measured profile: %s", profile.notes)
    else:
        profile = DeviceProfile.load(profile_name)
    spt = profile.token_seconds(args.model_bytes)  # device seconds per token, batch overheads aside
    spec = replace(spec, burst_rate=args.burst_load / spt / spec.mean_tokens())
    rate = args.rate if args.rate is not None else rate_for_load(spec, args.load, spt)
    spec = replace(spec, rate=rate)
    return spec, profile, generate(spec)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run every selected policy under every selected placement on the same trace; print tables; return
    the results (JSON-ready). ``--capacity`` runs the capacity search instead (``trace_capacity``)."""
    if getattr(args, "capacity", False) or args.mode == "ray":
        return _run_elsewhere(args)
    placements = _placements(args.placement)
    spec, profile, arrivals = build_trace(args)
    calibration = None
    if args.mode == "real" and getattr(args, "calibrate", "auto") == "yes":
        from ptmserve.bench.trace_calibrate import calibrate

        profile, calibration = calibrate(spec, profile, args)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    device_models = args.device_models or (4 if args.mode == "real" else 16)
    limits = SchedulerLimits(
        max_batch_requests=args.max_batch_requests, max_batch_tokens=args.max_batch_tokens
    )
    defaults = ClassDefaults(
        realtime_timeout_s=spec.realtime_timeout_ms / 1e3, batch_timeout_s=spec.batch_timeout_ms / 1e3
    )
    # The budget in bytes is the same under every placement; real mode's engine gets half a model of slack
    # (trace_real.open_target), and its twin the same budget.
    budget = device_models * args.model_bytes + (args.model_bytes // 2 if args.mode == "real" else 0)
    runs: dict[str, dict[str, object]] = {}
    for placement in placements:
        sizes, host_groups = placed_sizes(placement, spec, args)
        results: dict[str, dict[str, object]] = {}
        twins: dict[str, dict[str, object]] = {}
        for name in policies:
            started = time.perf_counter()
            sim = (name, arrivals, spec, profile, sizes, budget, limits, defaults, args)
            if args.mode == "sim":
                results[name] = _run_sim(*sim)
            else:
                placed_args = argparse.Namespace(**{**vars(args), "placement": placement})
                results[name] = _run_real(name, arrivals, spec, device_models, placed_args)
                # The simulator's twin: the same trace, budget, placement and measured profile, virtual time.
                twins[name] = _run_sim(*sim)
            results[name]["wall_seconds"] = round(time.perf_counter() - started, 2)
        per_model = max(sizes.values())
        runs[placement] = {
            "host_groups": host_groups,
            "model_bytes": per_model,  # device bytes per model as placed (the largest, if they differ)
            "saving": round(1 - per_model / args.model_bytes, 4),
            "device_budget_bytes": budget,
            "models_resident": budget // per_model,  # models as placed that the device budget holds
            "policies": results,
            "vs_fifo_lru": _ratios(results),
        }
        if twins:
            runs[placement]["sim_twin"] = twins
            runs[placement]["sim_vs_real"] = _agreement(results, twins)
    first = runs[placements[0]]
    report = {
        "mode": args.mode,
        "workload": spec.to_dict(),
        "requests": len(arrivals),
        "device_models": device_models,
        "model_bytes": args.model_bytes,
        "profile": profile.to_dict(),
        "limits": {
            "max_batch_requests": limits.max_batch_requests,
            "max_batch_tokens": limits.max_batch_tokens,
        },
        "predictive_baselines": bool(args.predictive_baselines),
        "calibration": calibration,
        "placement": placements[0],  # the placement of the top-level figures
        "policies": first["policies"],
        "vs_fifo_lru": first["vs_fifo_lru"],
        "placements": runs,
        "placement_vs_first": {p: _placement_ratios(first, r) for p, r in runs.items() if r is not first},
    }
    if "sim_twin" in first:
        report["sim_twin"] = first["sim_twin"]
        report["sim_vs_real"] = first["sim_vs_real"]
    for placement, r in runs.items():
        print(_placement_line(placement, r, args.model_bytes))
        print(format_table({**report, "policies": r["policies"], "vs_fifo_lru": r["vs_fifo_lru"]}))
        if "sim_twin" in r:
            twins = r["sim_twin"]
            print("simulator twin of the real run (same trace, placement and profile):")
            print(format_table({**report, "policies": twins, "vs_fifo_lru": _ratios(twins), "mode": "sim"}))  # type: ignore[arg-type]
            for name, d in r["sim_vs_real"].items():  # type: ignore[attr-defined]
                print(f"sim vs real, {name}: " + ", ".join(f"{k} {_pct_diff(v)}" for k, v in d.items()))
    if len(runs) > 1:
        print(format_placements(report))
    return report  # the CLI writes it to --json


def _run_elsewhere(args: argparse.Namespace) -> dict[str, object]:
    """``--capacity`` (``trace_capacity``) and ``--mode ray`` (``trace_ray``) have modules of their own."""
    if args.mode == "ray":
        from ptmserve.bench.trace_ray import run_ray

        return run_ray(args)
    from ptmserve.bench.trace_capacity import run_capacity

    return run_capacity(args)


def _placements(text: str) -> list[str]:
    placements = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown or not placements:
        raise SystemExit(f"--placement: expected some of {', '.join(PLACEMENTS)}, got {text!r}")
    return placements


def placed_sizes(
    placement: str, spec: WorkloadSpec, args: argparse.Namespace
) -> tuple[dict[str, int], list[str]]:
    """Device bytes of each trace model under ``placement``, and the load groups it leaves on the host.

    Real and ray modes: as the engine's weight manager places the real models, stored in ``--weights``
    (under ``auto`` they are profiled first, and the profiles stored for the engine to read). Sim mode:
    ``--model-bytes`` less the share of a MiniLM-shaped model's bytes the placement leaves on the host
    (``--host-share``, else measured).
    """
    names = spec.model_names()
    weights = getattr(args, "weights", "fp")
    if placement == DEVICE and weights == "fp":
        return {m: args.model_bytes for m in names}, []
    if args.mode in ("real", "ray"):
        from ptmserve.bench.trace_real import placed_bytes

        sizes, groups = placed_bytes(spec, placement, weights)
        return sizes, groups
    if weights != "fp":
        raise InvalidInput("--weights needs --mode real or ray (the simulator takes --model-bytes)")
    if args.host_share is not None:
        share, groups = args.host_share, ["(--host-share)"]
    else:
        from ptmserve.bench.trace_real import host_share

        share, groups = host_share(placement)
    return {m: round(args.model_bytes * (1 - share)) for m in names}, groups


def _run_sim(
    name: str,
    arrivals: Sequence[Arrival],
    spec: WorkloadSpec,
    profile: DeviceProfile,
    sizes: Mapping[str, int],
    device_budget: int,
    limits: SchedulerLimits,
    defaults: ClassDefaults,
    args: argparse.Namespace,
) -> dict[str, object]:
    # ``sizes`` are device bytes as placed; a batch computes every group wherever its weights are, so its
    # time (the truth, and the scheduler's prior) comes from the whole model's bytes.
    compute = (profile.batch_overhead_s, profile.token_seconds(args.model_bytes))
    config = SimConfig(
        sizes=sizes,
        device_budget=device_budget,
        truth=profile,
        exec_params={m: compute for m in sizes},
        exec_noise=args.exec_noise,
        seed=args.seed,
        defaults=defaults,
    )
    clock = SimClock()
    predictive = True if (args.predictive_baselines and name != "fastptm") else None
    costs = CostModel(profile)
    for m in sizes:
        costs.set_exec(m, *compute)
    scheduler = Scheduler(make_policy(name, predictive_expiry=predictive), costs, limits, clock)
    result = simulate(arrivals, scheduler, clock, config, name)
    counters = {
        "loads": result.loads,
        "prefetches": result.prefetches,
        "prefetches_unused": result.prefetches_unused,
        "loaded_bytes": result.loaded_bytes,
        "evictions": result.evictions,
        "steps": result.steps,
        "busy_seconds": round(result.busy_seconds, 3),
    }
    return summarize(result.records, spec.duration_s, counters)


class EngineTarget(Protocol):
    """What ``--mode real`` drives: the real engine behind a thin adapter (``ptmserve.bench.trace_real``)."""

    async def submit(self, model: str, tokens: int, priority: int, timeout_us: int | None) -> None:
        """Run one request of ``tokens`` tokens on ``model`` with Triton's schedule-policy parameters and
        return when its result is delivered.

        Raises:
            DeadlineExceeded: it timed out (counted as a timeout).
            Overloaded: its queue was full (counted as rejected).
            Exception: anything else (counted as an error).
        """

    def counters(self) -> Mapping[str, float]:
        """Engine-wide totals so far: ``loads`` (switches, prefetches included), ``prefetches``,
        ``loaded_bytes``, ``evictions`` and ``steps``; ``run_real`` reports their growth during the trace."""


# open_target(policy, spec, device_models, args): an async context manager yielding an EngineTarget that
# serves ``spec.model_names()`` (MiniLM-shaped) under ``policy`` with a device budget of ``device_models``
# models, and shuts the engine down on exit. ``ptmserve.bench.trace_real.open_target`` provides it.
OpenTarget = Callable[[str, WorkloadSpec, int, argparse.Namespace], AbstractAsyncContextManager[EngineTarget]]


def _run_real(
    name: str, arrivals: Sequence[Arrival], spec: WorkloadSpec, device_models: int, args: argparse.Namespace
) -> dict[str, object]:
    try:
        from ptmserve.bench.trace_real import open_target  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SystemExit(f"--mode real needs ptmserve.bench.trace_real.open_target: {exc}") from exc
    return run_real(open_target, name, arrivals, spec, device_models, args)


def run_real(
    open_target: OpenTarget,
    policy: str,
    arrivals: Sequence[Arrival],
    spec: WorkloadSpec,
    device_models: int,
    args: argparse.Namespace,
    *,
    observe: Callable[[EngineTarget], None] | None = None,
) -> dict[str, object]:
    """Replay ``arrivals`` in real time against the engine ``open_target`` opens; summarise like the sim.

    The replay runs in a process of its own (``trace_loadgen``) unless ``args.loadgen`` is "inline";
    the summary's ``loadgen`` then says what the generator cost. ``observe(target)`` is called once the
    engine is ready, before the replay (the calibration attaches its step recorder there).
    """
    from ptmserve.bench.trace_loadgen import LoadGenerator

    defaults = ClassDefaults(
        realtime_timeout_s=spec.realtime_timeout_ms / 1e3, batch_timeout_s=spec.batch_timeout_ms / 1e3
    )
    inline = getattr(args, "loadgen", "process") == "inline"

    async def main() -> dict[str, object]:
        generator = None if inline else LoadGenerator(arrivals, defaults)  # spawned before the engine
        try:
            async with open_target(policy, spec, device_models, args) as target:
                if observe is not None:
                    observe(target)
                before = dict(target.counters())
                if generator is None:
                    records, load = await replay(arrivals, target, defaults), None
                else:
                    load = await generator.serve(target)
                    records = load.records
                after = dict(target.counters())
        finally:
            if generator is not None:
                generator.close()
        counters = {k: v - before.get(k, 0) for k, v in after.items()}
        counters.setdefault("loads", 0)
        counters.setdefault("loaded_bytes", 0)
        out = summarize(records, spec.duration_s, counters)
        if load is not None:
            out["loadgen"] = {
                "cpu_seconds": round(load.cpu_seconds, 3),
                "cpu_per_request_s": round(load.cpu_per_request_s, 7),
                "cpu_share_of_one_core": round(load.cpu_seconds / max(load.wall_seconds, 1e-9), 4),
                "send_lag_p50_s": round(load.send_lag_p50_s, 6),
                "send_lag_max_s": round(load.send_lag_max_s, 6),
            }
        return out

    return asyncio.run(main())


async def replay(
    arrivals: Sequence[Arrival], target: EngineTarget, defaults: ClassDefaults = ClassDefaults()
) -> list[Record]:
    """Submit each arrival at its time (relative to the call) and wait for all; one record each, times
    relative to the start, deadlines from when the request was actually submitted."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    records: list[Record] = []

    async def one(a: Arrival, rec: Record) -> None:
        try:
            await target.submit(a.model, a.tokens, a.priority, a.timeout_us)
            outcome = Outcome.SUCCESS if loop.time() - t0 <= rec.deadline else Outcome.TIMEOUT
        except DeadlineExceeded:
            outcome = Outcome.TIMEOUT
        except Overloaded:
            outcome = Outcome.REJECTED
        except Exception:  # noqa: BLE001 - any other failure is an error outcome
            logger.debug("request %d failed", rec.id, exc_info=True)
            outcome = Outcome.ERROR
        rec.outcome, rec.finish = outcome, loop.time() - t0

    tasks = []
    for a in arrivals:
        delay = t0 + a.time - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time() - t0
        cls = request_class(a.priority, defaults.default_class)
        rec = Record(len(records), a.model, cls, now, deadline_from(a.timeout_us, cls, now, defaults))
        records.append(rec)
        tasks.append(asyncio.ensure_future(one(a, rec)))
    await asyncio.gather(*tasks)
    return records
