"""``ptmserve bench trace --mode ray --replicas N``: the real trace through Ray Serve, two ways of routing.

The same seeded trace as ``--mode real`` (16 MiniLM-shaped models with distinct random weights, the
engine's measured profile, real time) is replayed twice against N engine replicas on a local Ray
instance, each replica an ``Engine`` with the real mode's settings (a device budget of ``device_models``
models, every model warmed into its host tier first, so a switch is a host-to-device load):

- ``ptmserve``: ptmserve's ``TierRouter`` (device tier, then host tier, then least loaded, with
  deadlines);
- ``ray``: Ray Serve's default router around the same engine, with a plain
  ``@serve.multiplexed(max_num_models_per_replica=device_models)`` loader that loads the model onto the
  engine's device (and unloads it when Ray's LRU evicts it).

Requests go from a load-generator process to this process, which holds the deployment handle (so both
routers run here, as they would in the ingress) and forwards token ids through ``RayEngine``, the
ingress's forwarding data plane; no HTTP. Switches are the replicas' device loads summed; goodput and
real-time p99 as in the other modes (``trace_report.summarize``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ptmserve.bench.trace_real import EngineTarget
from ptmserve.bench.workload import WorkloadSpec

logger = logging.getLogger(__name__)

ROUTERS = ("ptmserve", "ray")
TARGET_SWITCHES_FEWER = 2.0


def run_ray(args: argparse.Namespace) -> dict[str, object]:
    """Build the trace as ``--mode real`` does, replay it under each router, print the table; return the
    results (JSON-ready)."""
    from ray import serve

    from ptmserve.bench.trace import build_trace, run_real
    from ptmserve.ray.launch import cores, start_ray

    real_args = argparse.Namespace(**{**vars(args), "mode": "real"})
    spec, profile, arrivals = build_trace(real_args)
    device_models = args.device_models or 4
    replicas = getattr(args, "replicas", 2) or 2
    routers = [r for r in (getattr(args, "routers", None) or ",".join(ROUTERS)).split(",") if r]
    start_ray(None)
    results: dict[str, dict[str, object]] = {}
    try:
        serve.start(proxy_location="Disabled")
        for router in routers:
            started = time.perf_counter()
            ns = argparse.Namespace(**{**vars(real_args), "replicas": replicas, "cores": cores()})
            results[router] = run_real(_open_target, router, arrivals, spec, device_models, ns)
            results[router]["wall_seconds"] = round(time.perf_counter() - started, 2)
    finally:
        try:
            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
    report = {
        "mode": "ray",
        "replicas": replicas,
        "workload": spec.to_dict(),
        "requests": len(arrivals),
        "device_models_per_replica": device_models,
        "profile": profile.to_dict(),
        "routers": results,
        "vs_ray_default": _ratios(results),
        "target": {"switches_fewer": TARGET_SWITCHES_FEWER, "goodput_gain": 1.0},
    }
    print(format_ray_table(report))
    return report


def _ratios(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float | str | None]:
    ours, base = results.get("ptmserve"), results.get("ray")
    if ours is None or base is None:
        return {}

    def div(a: float, b: float) -> float | str | None:
        if b == 0:
            return None if a == 0 else "inf"
        return round(a / b, 3)

    return {
        "switches_fewer": div(base["switches"], ours["switches"]),
        "goodput_gain": div(ours["goodput_rps"], base["goodput_rps"]),
        "timeouts_fewer": div(base["timeouts"], ours["timeouts"]),
    }


def format_ray_table(report: Mapping[str, Any]) -> str:
    """The routers side by side as a markdown table, then the ratios against the target."""
    lines = [
        f"trace: {report['requests']} requests, {report['workload']['models']} models, "
        f"{report['workload']['duration_s']:g} s; {report['replicas']} replicas, device budget "
        f"{report['device_models_per_replica']} models each",
        "",
        "| router | switches | goodput (req/s) | timeouts | real-time p99 (s) "
        "| real-time p99 of successes (s) | real-time ok | batch ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["routers"].items():
        rt, bt = r["classes"]["realtime"], r["classes"]["batch"]
        p99 = "missed" if rt["p99_s"] is None else f"{rt['p99_s']:.3f}"  # missed: < 99% in time
        ok99 = "-" if rt["success_p99_s"] is None else f"{rt['success_p99_s']:.3f}"
        lines.append(
            f"| {name} | {r['switches']:g} | {r['goodput_rps']:.2f} | {r['timeouts']} | {p99} | {ok99} | "
            f"{rt['success']}/{rt['requests']} | {bt['success']}/{bt['requests']} |"
        )
    ratios = report["vs_ray_default"]
    if ratios:
        lines += [
            "",
            f"ptmserve vs Ray's default: {ratios['switches_fewer']}x fewer switches (target >= "
            f"{TARGET_SWITCHES_FEWER:g}x), goodput x{ratios['goodput_gain']} (target >= 1)",
        ]
    return "\n".join(lines)


class RayTarget(EngineTarget):
    """``trace_real``'s target over the replicas, through the ingress's ``RayEngine``."""

    def counters(self) -> Mapping[str, float]:
        """Device loads (switches) so far, summed over every replica this process heard from: each
        answer carries its replica's count, so this works under Ray's default router too (which cannot
        ask one replica for its metrics). Under ptmserve's router, also its decisions (``route_*``)."""
        from ptmserve.ray import board

        out = {"loads": float(sum(s.loads for s in board.states()))}
        for router in board.routers:
            for kind, n in router.decisions.items():
                out[f"route_{kind}"] = out.get(f"route_{kind}", 0.0) + n
        return out


@contextlib.asynccontextmanager
async def _open_target(
    router: str, spec: WorkloadSpec, device_models: int, args: argparse.Namespace
) -> AsyncIterator[RayTarget]:
    """The replica deployment under ``router`` serving ``spec``'s models, warmed into each replica's host
    tier; deleted on exit."""
    from ray import serve

    from ptmserve.bench.trace_real import MINILM, _repository, model_bytes
    from ptmserve.engine.engine import EngineSettings
    from ptmserve.ray.application import RayAppConfig, replica_deployment
    from ptmserve.ray.frontend import RayEngine

    repo = _repository(spec, getattr(args, "weights", "fp"))
    per_model = model_bytes()
    settings = EngineSettings(
        dtype="bfloat16",
        policy="fastptm",
        device_memory=device_models * per_model + per_model // 2,  # as --mode real
        host_memory="16GiB",
        realtime_timeout_s=spec.realtime_timeout_ms / 1e3,
        batch_timeout_s=spec.batch_timeout_ms / 1e3,
        placement="device",
    )
    config = RayAppConfig(
        repo=str(repo.root),
        replicas=args.replicas,
        engine=settings,
        threads_per_replica=max(1, args.cores // args.replicas),
        router=router,
        max_models_per_replica=device_models,
        warm_up=False,
        warm_host=True,
        name=f"bench-{router}",
    )
    app = replica_deployment(config).bind(config)
    handle = await asyncio.to_thread(serve.run, app, name=config.name, route_prefix=None)
    engine = RayEngine(handle, repo.root, settings, replicas=args.replicas)
    try:
        logger.info("%s: %d replicas up, models in every host tier", router, args.replicas)
        yield RayTarget(engine, MINILM.vocab_size)
    finally:
        engine.close()
        await asyncio.to_thread(serve.delete, config.name)
