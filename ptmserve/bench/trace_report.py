"""The figures and tables of ``ptmserve bench trace``: one run's summary, ratios, and the text tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ptmserve.engine.requests import Outcome, RequestClass
from ptmserve.engine.simulator import Record

TARGETS = {"switches": 4.5, "timeouts": 13.0, "goodput": 2.0}  # fifo-lru / ours, ours / fifo-lru


def summarize(records: Sequence[Record], duration: float, counters: Mapping[str, float]) -> dict[str, object]:
    """The per-policy figures of one run: outcomes, goodput, latency per class, and ``counters``."""
    out: dict[str, object] = {k: counters[k] for k in counters}
    outcomes = {o.value: 0 for o in Outcome}
    for r in records:
        outcomes[(r.outcome or Outcome.ERROR).value] += 1
    out["outcomes"] = outcomes
    out["switches"] = counters.get("loads", 0)
    out["timeouts"] = outcomes[Outcome.TIMEOUT.value]
    out["goodput_rps"] = round(outcomes[Outcome.SUCCESS.value] / duration, 4) if duration > 0 else 0.0
    classes: dict[str, object] = {}
    for cls in RequestClass:
        mine = [r for r in records if r.cls is cls]
        lat = sorted(
            (r.finish - r.arrival) if r.outcome is Outcome.SUCCESS and r.finish is not None else math.inf
            for r in mine
        )
        ok = [x for x in lat if math.isfinite(x)]
        classes[cls.name.lower()] = {
            "requests": len(mine),
            "success": len(ok),
            "p50_s": _finite(_pct(lat, 50)),
            "p99_s": _finite(_pct(lat, 99)),
            "success_p99_s": _finite(_pct(ok, 99)),
        }
    out["classes"] = classes
    return out


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def _finite(x: float) -> float | None:
    """JSON-safe: None stands for "missed" (infinitely late) or undefined."""
    return round(x, 6) if math.isfinite(x) else None


def _ratios(results: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, float | str | None]]:
    base = results.get("fifo-lru")
    if base is None:
        return {}
    out: dict[str, dict[str, float | str | None]] = {}
    for name, r in results.items():
        out[name] = {
            "switches_fewer": _div(base["switches"], r["switches"]),  # type: ignore[arg-type]
            "timeouts_fewer": _div(base["timeouts"], r["timeouts"]),  # type: ignore[arg-type]
            "goodput_gain": _div(r["goodput_rps"], base["goodput_rps"]),  # type: ignore[arg-type]
        }
    return out


def _div(a: float, b: float) -> float | str | None:
    """``a / b``; "inf" (JSON-safe) when only ``b`` is 0; None when both are."""
    if b == 0:
        return None if a == 0 else "inf"
    return round(a / b, 3)


def format_table(report: Mapping[str, object]) -> str:
    """A plain-text table of ``report`` (what ``run`` prints)."""
    w = report["workload"]
    lines = [
        f"trace: {report['requests']} requests, {w['models']} models, {w['duration_s']:.0f} s, "  # type: ignore[index]
        f"device budget {report['device_models']} models, mode {report['mode']}",
        f"{'policy':<10} {'goodput/s':>9} {'success':>8} {'timeout':>8} {'reject':>7} {'switches':>9} "
        f"{'GB loaded':>9} {'rt p50':>8} {'rt p99':>8} {'batch p50':>9} {'batch p99':>9}",
    ]
    ratios = report["vs_fifo_lru"]
    for name, r in report["policies"].items():  # type: ignore[attr-defined]
        o, c = r["outcomes"], r["classes"]
        lines.append(
            f"{name:<10} {r['goodput_rps']:>9.2f} {o['success']:>8} {o['timeout']:>8} {o['rejected']:>7} "
            f"{r['switches']:>9} {r['loaded_bytes'] / 1e9:>9.2f} {_ms(c['realtime']['p50_s']):>8} "
            f"{_ms(c['realtime']['p99_s']):>8} {_ms(c['batch']['p50_s']):>9} {_ms(c['batch']['p99_s']):>9}"
        )
    for name, q in ratios.items():  # type: ignore[attr-defined]
        if name != "fifo-lru":
            lines.append(
                f"{name} vs fifo-lru: switches {_x(q['switches_fewer'])} fewer "
                f"(target {TARGETS['switches']}x), "
                f"timeouts {_x(q['timeouts_fewer'])} fewer (target {TARGETS['timeouts']}x), "
                f"goodput {_x(q['goodput_gain'])} (target {TARGETS['goodput']}x)"
            )
    return "\n".join(lines)


def _placement_ratios(
    base: Mapping[str, object], other: Mapping[str, object]
) -> dict[str, dict[str, float | str | None]]:
    """Per policy, ``other``'s switches, timeouts and goodput against ``base``'s (same trace and budget)."""
    out: dict[str, dict[str, float | str | None]] = {}
    for name, r in other["policies"].items():  # type: ignore[attr-defined]
        b = base["policies"][name]  # type: ignore[index]
        out[name] = {
            "switches_fewer": _div(b["switches"], r["switches"]),
            "timeouts_fewer": _div(b["timeouts"], r["timeouts"]),
            "goodput_gain": _div(r["goodput_rps"], b["goodput_rps"]),
        }
    return out


def _placement_line(placement: str, r: Mapping[str, object], full: int) -> str:
    groups = ", ".join(r["host_groups"]) or "none"  # type: ignore[arg-type]
    return (
        f"placement {placement}: on the host: {groups}; {r['model_bytes'] / 1e6:.1f} MB per model on the "  # type: ignore[operator]
        f"device of {full / 1e6:.1f} MB ({r['saving']:.1%} saved); the budget of "
        f"{r['device_budget_bytes'] / 1e6:.0f} MB holds {r['models_resident']} models"  # type: ignore[operator]
    )


def format_placements(report: Mapping[str, object]) -> str:
    """Every placement side by side, per policy: device bytes, models per budget, switches, goodput."""
    first = report["placement"]
    lines = [
        f"{'placement':<16} {'policy':<10} {'MB/model':>8} {'resident':>8} {'switches':>8} {'GB loaded':>9} "
        f"{'timeouts':>8} {'goodput/s':>9} {'switches fewer':>14} {'goodput gain':>12}  (vs {first})"
    ]
    for placement, r in report["placements"].items():  # type: ignore[attr-defined]
        q = report["placement_vs_first"].get(placement, {})  # type: ignore[attr-defined]
        for name, p in r["policies"].items():
            ratio = q.get(name, {"switches_fewer": 1.0, "goodput_gain": 1.0})
            lines.append(
                f"{placement:<16} {name:<10} {r['model_bytes'] / 1e6:>8.1f} {r['models_resident']:>8} "
                f"{p['switches']:>8} {p['loaded_bytes'] / 1e9:>9.2f} {p['timeouts']:>8} "
                f"{p['goodput_rps']:>9.2f} {_x(ratio['switches_fewer']):>14} {_x(ratio['goodput_gain']):>12}"
            )
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "miss" if x is None else f"{x * 1e3:.0f}ms"


def _x(x: float | str | None) -> str:
    return "n/a" if x is None else (f"{x:.2f}x" if isinstance(x, float) else str(x))


def _agreement(
    real: Mapping[str, Mapping[str, object]], sim: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, float | None]]:
    """Relative difference (sim - real) / real per policy of switches, timeouts, goodput and the
    real-time p99 of the requests that succeeded (None where real is 0 or undefined)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in real:
        if name not in sim:
            continue
        out[name] = {}
        for key, r, s in _measures(real[name], sim[name]):
            out[name][key] = None if r is None or s is None or r == 0 else round((s - r) / r, 4)
    return out


def _measures(
    real: Mapping[str, object], sim: Mapping[str, object]
) -> list[tuple[str, float | None, float | None]]:
    def rt_p99(r: Mapping[str, object]) -> float | None:
        return r["classes"]["realtime"]["success_p99_s"]  # type: ignore[index, return-value]

    return [
        (key, float(real[key]), float(sim[key]))  # type: ignore[arg-type]
        for key in ("switches", "timeouts", "goodput_rps")
    ] + [("rt_p99", rt_p99(real), rt_p99(sim))]


def _pct_diff(x: float | None) -> str:
    return "n/a (real is 0)" if x is None else f"{x:+.1%}"
