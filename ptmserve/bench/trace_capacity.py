"""``ptmserve bench trace --capacity``: each policy's capacity on the standard trace, and (real mode) how
far the simulator agrees with the real engine.

**Capacity** is the highest offered rate (requests/s, bursts included) at which at least 99% of the
real-time requests and 95% of the batch requests finish within their deadlines (``meets``). It is found
by ``search``: from a start rate, grow or shrink by a factor until a passing and a failing rate bracket
the boundary, then bisect, within a budget of probes. Each probe replays the standard trace at the
rate (``at_rate``: background and bursts scaled alike, the same seed, the bursts evenly spaced so
that a short probe carries its share of them), on a fresh scheduler (sim) or a fresh engine (real).

Real mode, in one invocation: the quiet profile and a calibration (``trace_calibrate``), the simulator's
capacities with that profile, the real capacities (each search starting from the policy's simulated
capacity, with few short probes), then at 0.3, 0.6 and 0.9 of fastptm's real capacity every policy real
and simulated (the agreement table), fastptm and fifo-naive at half fifo-naive's capacity, and fastptm
at 0.8 of its capacity.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from ptmserve.bench.workload import WorkloadSpec, generate
from ptmserve.engine.costs import DeviceProfile
from ptmserve.engine.requests import ClassDefaults
from ptmserve.engine.scheduler import SchedulerLimits

REALTIME_ATTAINMENT = 0.99
BATCH_ATTAINMENT = 0.95
BASELINES = ("fifo-lru", "edf-lru", "fifo-naive")
AGREEMENT_AT = (0.3, 0.6, 0.9)  # shares of fastptm's real capacity
CAPACITY_TARGETS = {"fifo-lru": 1.5, "fifo-naive": 3.0}  # real mode: fastptm's capacity / the baseline's
SIM_GPU_TARGET = 2.0  # sim, gpu-pcie4, 100 models: fastptm / fifo-lru
NAIVE_TARGETS = {"switches": 4.5, "timeouts": 13.0}  # at 0.5 of fifo-naive's capacity: naive / fastptm


@dataclass(frozen=True, slots=True)
class Probe:
    """One run at one offered rate."""

    rate: float
    ok: bool
    realtime: float  # share of real-time requests that met their deadline (1.0 when there were none)
    batch: float
    wall_s: float = 0.0


@dataclass(slots=True)
class Capacity:
    """What a search found: ``capacity`` passed, ``upper`` failed (None: every probe passed, so the
    capacity is only a lower bound); ``capacity`` is 0 when every probe failed."""

    capacity: float
    upper: float | None
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "capacity_rps": round(self.capacity, 3),
            "upper_rps": None if self.upper is None else round(self.upper, 3),
            "probes": [asdict(p) for p in self.probes],
        }


def attainment(summary: Mapping[str, object]) -> tuple[float, float]:
    """Shares of real-time and batch requests of a run's summary that met their deadlines."""
    classes = summary["classes"]

    def share(c: Mapping[str, int]) -> float:
        return c["success"] / c["requests"] if c["requests"] else 1.0

    return share(classes["realtime"]), share(classes["batch"])  # type: ignore[index]


def meets(summary: Mapping[str, object]) -> bool:
    rt, batch = attainment(summary)
    return rt >= REALTIME_ATTAINMENT and batch >= BATCH_ATTAINMENT


def search(
    probe: Callable[[float], Probe],
    start: float,
    *,
    rel_tol: float = 0.02,
    max_probes: int = 16,
    growth: float = 2.0,
    min_rate: float | None = None,
    max_rate: float | None = None,
) -> Capacity:
    """The highest rate that ``probe`` passes, assuming that passing is monotone in the rate.

    Grows (shrinks) ``start`` by ``growth`` until one rate passes and one fails, then bisects until the
    bracket is within ``rel_tol`` of the failing rate, or ``max_probes`` have run. Rates stay within
    ``[min_rate, max_rate]`` (default: ``start`` divided or multiplied by ``growth ** 8``).
    """
    if start <= 0 or growth <= 1 or max_probes < 1:
        raise ValueError(
            f"search: need start > 0, growth > 1, max_probes >= 1 (got {start}, {growth}, {max_probes})"
        )
    lo_bound = min_rate if min_rate is not None else start / growth**8
    hi_bound = max_rate if max_rate is not None else start * growth**8
    found = Capacity(0.0, None)
    rate = min(max(start, lo_bound), hi_bound)
    while len(found.probes) < max_probes:
        p = probe(rate)
        found.probes.append(p)
        if p.ok:
            found.capacity = max(found.capacity, rate)
        else:
            found.upper = rate if found.upper is None else min(found.upper, rate)
        if found.upper is None:  # everything passed so far
            if rate >= hi_bound:
                break
            rate = min(rate * growth, hi_bound)
        elif found.capacity == 0.0:  # everything failed so far
            if rate <= lo_bound:
                break
            rate = max(rate / growth, lo_bound)
        else:
            if found.upper <= found.capacity or found.upper - found.capacity <= rel_tol * found.upper:
                break
            rate = (found.capacity + found.upper) / 2
    return found


def at_rate(spec: WorkloadSpec, rate: float) -> WorkloadSpec:
    """``spec`` with background and burst rates scaled alike so that its mean offered rate is ``rate``:
    the trace keeps its shape (bursts stay the same share of the traffic). Bursts fixed at their share of
    the device's throughput instead would overload ``fifo-naive`` at every rate (one request per step
    cannot follow a burst of +30% of the device's token throughput), leaving it no capacity at all."""
    k = rate / spec.mean_rate()
    return replace(spec, rate=spec.rate * k, burst_rate=spec.burst_rate * k)


@dataclass(slots=True)
class Bench:
    """Everything one probe needs, in either mode."""

    args: argparse.Namespace
    spec: WorkloadSpec  # the standard trace at the duration of a probe (its rate is scaled per probe)
    profile: DeviceProfile
    sizes: Mapping[str, int]
    budget: int
    device_models: int
    limits: SchedulerLimits
    defaults: ClassDefaults
    log: list[str] = field(default_factory=list)

    def run(self, mode: str, policy: str, rate: float) -> dict[str, object]:
        from ptmserve.bench import trace

        spec = at_rate(self.spec, rate)
        arrivals = generate(spec, even_bursts=True)
        started = time.perf_counter()
        if mode == "sim":
            sim = (policy, arrivals, spec, self.profile, self.sizes, self.budget, self.limits, self.defaults)
            result = trace._run_sim(*sim, self.args)  # noqa: SLF001
        else:
            result = trace._run_real(policy, arrivals, spec, self.device_models, self.args)  # noqa: SLF001
        result["offered_rps"] = round(rate, 3)
        result["requests"] = len(arrivals)
        result["wall_seconds"] = round(time.perf_counter() - started, 2)
        return result

    def probe(self, mode: str, policy: str) -> Callable[[float], Probe]:
        def one(rate: float) -> Probe:
            result = self.run(mode, policy, rate)
            rt, batch = attainment(result)
            p = Probe(round(rate, 3), meets(result), round(rt, 5), round(batch, 5), result["wall_seconds"])  # type: ignore[arg-type]
            print(
                f"  {mode} {policy:<10} {rate:8.2f} req/s: real-time {rt:.2%}, batch {batch:.2%} -> "
                f"{'pass' if p.ok else 'fail'} ({p.wall_s:.1f} s)",
                flush=True,
            )
            return p

        return one


def capacities(bench: Bench, mode: str, policies: Sequence[str], starts: Mapping[str, float],
               **search_kw: object) -> dict[str, Capacity]:  # fmt: skip
    out = {}
    for policy in policies:
        print(f"capacity, {mode}, {policy}: start {starts[policy]:.2f} req/s", flush=True)
        out[policy] = search(bench.probe(mode, policy), starts[policy], **search_kw)  # type: ignore[arg-type]
        print(f"capacity, {mode}, {policy}: {out[policy].capacity:.2f} req/s", flush=True)
    return out


def ratios(caps: Mapping[str, Capacity]) -> dict[str, dict[str, float | None]]:
    """Each policy's capacity over each baseline's (None when the baseline's is 0)."""
    return {
        p: {b: (round(c.capacity / caps[b].capacity, 3) if caps[b].capacity > 0 else None)
            for b in BASELINES if b in caps}
        for p, c in caps.items()
    }  # fmt: skip


def run_capacity(args: argparse.Namespace) -> dict[str, object]:
    """``bench trace --capacity`` (see the module docstring): prints progress, returns the report."""
    from ptmserve.bench import trace

    real = args.mode == "real"
    if args.duration is None:
        args.duration = args.probe_seconds or (20.0 if real else 600.0)
    spec, profile, _ = trace.build_trace(args)  # the quiet profile in real mode
    report: dict[str, object] = {"mode": args.mode, "workload": spec.to_dict()}
    if real and args.calibrate != "no":
        from ptmserve.bench.trace_calibrate import calibrate

        t0 = time.perf_counter()
        profile, report["calibration"] = calibrate(spec, profile, args)
        print(f"calibrated in {time.perf_counter() - t0:.0f} s: {profile.notes}", flush=True)
    report["profile"] = profile.to_dict()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    device_models = args.device_models or (4 if real else 16)
    names = spec.model_names()
    bench = Bench(
        args=args,
        spec=spec,
        profile=profile,
        sizes={m: args.model_bytes for m in names},
        budget=device_models * args.model_bytes + (args.model_bytes // 2 if real else 0),
        device_models=device_models,
        limits=SchedulerLimits(
            max_batch_requests=args.max_batch_requests, max_batch_tokens=args.max_batch_tokens
        ),
        defaults=ClassDefaults(spec.realtime_timeout_ms / 1e3, spec.batch_timeout_ms / 1e3),
    )
    report["device_models"] = device_models
    start = spec.mean_rate()
    sim_caps = capacities(bench, "sim", policies, dict.fromkeys(policies, start),
                          rel_tol=0.01, max_probes=args.probes or 16)  # fmt: skip
    report["sim"] = {"capacity": {p: c.to_dict() for p, c in sim_caps.items()}, "ratios": ratios(sim_caps)}
    caps = sim_caps
    if real:
        starts = {p: max(sim_caps[p].capacity, start / 8) for p in policies}
        real_caps = capacities(bench, "real", policies, starts, rel_tol=0.05, max_probes=args.probes or 5,
                               growth=1.4)  # fmt: skip
        report["real"] = {
            "capacity": {p: c.to_dict() for p, c in real_caps.items()},
            "ratios": ratios(real_caps),
        }
        caps = real_caps
        if "fastptm" in caps and caps["fastptm"].capacity > 0:
            report["agreement"] = agreement(bench, policies, caps["fastptm"].capacity)
    report["checks"] = checks(bench, args.mode, caps, real)
    report["targets"] = targets(report)
    print(format_capacity(report), flush=True)
    return report


def agreement(bench: Bench, policies: Sequence[str], capacity: float) -> list[dict[str, object]]:
    """Every policy real and simulated at ``AGREEMENT_AT`` shares of ``capacity``."""
    from ptmserve.bench.trace_report import _agreement

    rows = []
    for share in AGREEMENT_AT:
        rate = share * capacity
        real = {p: bench.run("real", p, rate) for p in policies}
        sim = {p: bench.run("sim", p, rate) for p in policies}
        diff = _agreement(real, sim)
        for p in policies:
            rows.append({"share": share, "rate": round(rate, 3), "policy": p, "real": _brief(real[p]),
                         "sim": _brief(sim[p]), "diff": diff[p]})  # fmt: skip
            print(f"agreement at {share} x capacity, {p}: {diff[p]}", flush=True)
    return rows


def checks(bench: Bench, mode: str, caps: Mapping[str, Capacity], real: bool) -> dict[str, object]:
    """fastptm against fifo-naive at half fifo-naive's capacity; fastptm at 0.8 of its capacity."""
    out: dict[str, object] = {}
    modes = ("real", "sim") if real else ("sim",)
    if "fifo-naive" in caps and "fastptm" in caps and caps["fifo-naive"].capacity > 0:
        rate = 0.5 * caps["fifo-naive"].capacity
        for m in modes:
            runs = {p: bench.run(m, p, rate) for p in ("fastptm", "fifo-naive")}
            out[f"half_naive_{m}"] = {"rate": round(rate, 3), **{p: _brief(r) for p, r in runs.items()}}
    if "fastptm" in caps and caps["fastptm"].capacity > 0:
        rate = 0.8 * caps["fastptm"].capacity
        for m in modes:
            out[f"fastptm_at_0.8_{m}"] = {"rate": round(rate, 3), **_brief(bench.run(m, "fastptm", rate))}
    return out


def _brief(r: Mapping[str, object]) -> dict[str, object]:
    rt = r["classes"]["realtime"]  # type: ignore[index]
    brief = {
        "requests": r.get("requests"),
        "goodput_rps": r["goodput_rps"],
        "timeouts": r["timeouts"],
        "switches": r["switches"],
        "rt_p99_s": rt["p99_s"],
        "rt_success_p99_s": rt["success_p99_s"],
    }
    if "loadgen" in r:
        brief["loadgen"] = r["loadgen"]
    return brief


def targets(report: Mapping[str, object]) -> list[dict[str, object]]:
    """The issue's targets that this report measures, met or not. In sim mode the capacity targets are
    the real mode's, except with the ``gpu-pcie4`` profile (fifo-lru: >= 2x)."""
    rows: list[dict[str, object]] = []
    mode = "real" if "real" in report else "sim"
    r = report[mode]["ratios"].get("fastptm", {})  # type: ignore[index]
    wanted = dict(CAPACITY_TARGETS)
    if mode == "sim" and report["profile"]["name"] == "gpu-pcie4":  # type: ignore[index]
        wanted = {"fifo-lru": SIM_GPU_TARGET}
    for base, want in wanted.items():
        got = r.get(base)
        rows.append({"target": f"capacity, {mode} mode ({report['profile']['name']}), vs {base}",  # type: ignore[index]
                     "want": f">= {want}x", "got": got, "met": got is not None and got >= want})  # fmt: skip
    for key, c in report["checks"].items():  # type: ignore[attr-defined]
        if key.startswith("half_naive_"):
            for measure, want in NAIVE_TARGETS.items():
                ours, naive = c["fastptm"][measure], c["fifo-naive"][measure]
                rows.append({"target": f"{measure} at 0.5 of fifo-naive's capacity ({key[11:]})",
                             "want": f"fifo-naive / fastptm >= {want}",
                             "got": f"{naive} / {ours}" + (f" = {naive / ours:.2f}" if ours else ""),
                             "met": None if ours == naive == 0 else ours * want <= naive})  # fmt: skip
        if key.startswith("fastptm_at_0.8_"):
            p99 = c["rt_p99_s"]
            deadline = report["workload"]["realtime_timeout_ms"] / 1e3  # type: ignore[index]
            rows.append({"target": f"real-time p99 at 0.8 of capacity ({key[15:]})",
                         "want": f"<= {deadline} s", "got": p99,
                         "met": p99 is not None and p99 <= deadline})  # fmt: skip
    return rows


def format_capacity(report: Mapping[str, object]) -> str:
    lines = []
    for mode in ("sim", "real"):
        if mode not in report:
            continue
        caps = report[mode]["capacity"]  # type: ignore[index]
        rat = report[mode]["ratios"]  # type: ignore[index]
        lines.append(f"capacity, {mode} mode (req/s at >= 99% real-time and >= 95% batch within deadline):")
        for p, c in caps.items():
            upper = "none failed" if c["upper_rps"] is None else f"< {c['upper_rps']:.2f}"
            vs = ", ".join(f"{v}x vs {b}" for b, v in rat[p].items() if b != p)
            lines.append(f"  {p:<10} {c['capacity_rps']:8.2f} ({upper}; {len(c['probes'])} probes)  {vs}")
    for row in report.get("agreement", []):  # type: ignore[attr-defined]
        d = ", ".join(f"{k} {'n/a' if v is None else f'{v:+.0%}'}" for k, v in row["diff"].items())
        lines.append(f"  agreement {row['share']} x cap, {row['policy']:<10}: {d}")
    for t in report["targets"]:  # type: ignore[attr-defined]
        lines.append(
            f"  target {t['target']}: want {t['want']}, got {t['got']} -> "
            + ("n/a (neither had any)" if t["met"] is None else "met" if t["met"] else "MISSED")
        )
    return "\n".join(lines)
