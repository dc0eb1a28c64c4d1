"""The soak test's samples, their CSV and plot, and the verdict.

A sample is taken every interval: the server process's resident memory, open file descriptors and
threads (``/proc/<pid>``), the tiers' resident bytes and the switch counters (``/metrics``), and the
client's cumulative count of every outcome. ``judge`` turns the samples into a pass or a fail.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ptmserve.bench.soak_traffic import FAILURES, OUTCOMES

MIB = 2**20
RSS_GROWTH_LIMIT = 0.10  # fail if RSS ends more than 10% above its value at the end of the warm-up
FULL_WARMUP_S = 300.0  # the warm-up of a run of 10 minutes or more


def warmup_seconds(duration_s: float) -> float:
    """The warm-up before the RSS baseline: five minutes, or half the run when it is under ten
    minutes (a 2-minute run takes its baseline at 1 minute), so short runs still judge growth."""
    return min(FULL_WARMUP_S, duration_s / 2)


@dataclass(slots=True)
class Sample:
    """One row of the CSV."""

    t_s: float  # seconds since the traffic started
    rss_bytes: int  # the server's VmRSS
    fds: int  # entries of /proc/<pid>/fd
    threads: int  # the server's threads
    host_resident_bytes: float  # ptmserve_resident_bytes{tier="host"}; NaN if /metrics did not answer
    device_resident_bytes: float  # ptmserve_resident_bytes{tier="device"}
    loads: float  # sum of ptmserve_model_loads_total (switches onto the device)
    evictions: float  # sum of ptmserve_model_evictions_total
    ok_p50_ms: float  # latency of the ``ok`` requests that ended since the previous sample; NaN if none
    ok_p99_ms: float
    ok_max_ms: float
    rt_p99_ms: float  # p99 of the real-time (priority 1) ``ok`` requests only
    outcomes: dict[str, int] = field(default_factory=dict)  # cumulative client-side outcome counts

    def row(self) -> dict[str, object]:
        out = {k: v for k, v in asdict(self).items() if k != "outcomes"}
        out.update({name: self.outcomes.get(name, 0) for name in OUTCOMES})
        return out


COLUMNS = [f.name for f in fields(Sample) if f.name != "outcomes"] + list(OUTCOMES)


def read_proc(pid: int) -> tuple[int, int, int]:
    """(VmRSS bytes, open file descriptors, threads) of process ``pid``.

    Raises:
        OSError: the process is gone.
    """
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024  # reported in kB
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def read_metrics(text: str) -> dict[str, float]:
    """The figures the soak plots, from the Prometheus text of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"host_resident_bytes": math.nan, "device_resident_bytes": math.nan, "loads": 0.0, "evictions": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ptmserve_resident_bytes" and s.labels.get("tier") in ("host", "device"):
                out[f"{s.labels['tier']}_resident_bytes"] = s.value
            elif s.name == "ptmserve_model_loads_total":
                out["loads"] += s.value
            elif s.name == "ptmserve_model_evictions_total":
                out["evictions"] += s.value
    return out


def latency_ms(all_s: Sequence[float], realtime_s: Sequence[float] = ()) -> dict[str, float]:
    """p50, p99 and max of sorted latencies in seconds, and p99 of the real-time ones, in milliseconds
    (NaN where there are none)."""

    def pick(xs: Sequence[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else math.nan

    return {
        "ok_p50_ms": pick(all_s, 0.5),
        "ok_p99_ms": pick(all_s, 0.99),
        "ok_max_ms": pick(all_s, 1.0),
        "rt_p99_ms": pick(realtime_s, 0.99),
    }


def write_csv(path: Path, samples: Sequence[Sample]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for s in samples:
            writer.writerow(s.row())


def read_csv(path: Path) -> list[Sample]:
    """The samples of a CSV written by ``write_csv`` (to judge or plot a run again)."""
    samples = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            samples.append(
                Sample(
                    t_s=float(row["t_s"]),
                    rss_bytes=int(row["rss_bytes"]),
                    fds=int(row["fds"]),
                    threads=int(row["threads"]),
                    host_resident_bytes=float(row["host_resident_bytes"]),
                    device_resident_bytes=float(row["device_resident_bytes"]),
                    loads=float(row["loads"]),
                    evictions=float(row["evictions"]),
                    ok_p50_ms=float(row["ok_p50_ms"]),
                    ok_p99_ms=float(row["ok_p99_ms"]),
                    ok_max_ms=float(row["ok_max_ms"]),
                    rt_p99_ms=float(row["rt_p99_ms"]),
                    outcomes={k: int(row[k]) for k in OUTCOMES if k in row},
                )
            )
    return samples


# ------------------------------------------------------------------------------------------- verdict


@dataclass(slots=True)
class Verdict:
    """Whether the soak passed: every failure and warning in words, and the RSS figures."""

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rss_baseline_bytes: int | None = None  # median of the first samples at or after the warm-up
    rss_final_bytes: int | None = None  # median of the last samples
    rss_growth: float | None = None  # final / baseline - 1

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(samples: Sequence[Sample], warmup_s: float, *, rss_limit: float = RSS_GROWTH_LIMIT) -> Verdict:
    """Judge a run from its samples (the last one taken after the traffic stopped).

    Fails when: there are no samples; no request succeeded; any request ended in a ``FAILURES``
    outcome (no outcome, a 500, a wrong status, a wrong body); or RSS grew more than ``rss_limit``
    after the warm-up. RSS is noisy (the allocator keeps and returns memory as models of different
    sizes come and go), so both ends are medians: the baseline of the first k samples at or after
    ``warmup_s``, the final value of the last k samples, k = min(3, half the samples after the
    warm-up). Warns (without failing) when no RSS baseline exists (a run shorter than its warm-up),
    when no model switched, and when file descriptors or threads grew after the warm-up.
    """
    v = Verdict()
    if not samples:
        v.failures.append("no samples were taken")
        return v
    last = samples[-1]
    if last.outcomes.get("ok", 0) == 0:
        v.failures.append("no request succeeded")
    for name in FAILURES:
        if last.outcomes.get(name, 0):
            v.failures.append(f"{last.outcomes[name]} request(s) ended as {name}")
    if last.outcomes.get("not_ready", 0):
        v.warnings.append(f"{last.outcomes['not_ready']} request(s) were answered 503 (not ready)")
    if len(samples) > 1 and last.loads <= samples[0].loads:
        v.warnings.append("no model was switched onto the device: the device budget holds every model")
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 2:
        v.warnings.append(f"no RSS verdict: fewer than two samples after the {warmup_s:.0f} s warm-up")
        return v
    k = min(3, len(after) // 2)
    base = int(statistics.median(s.rss_bytes for s in after[:k]))
    final = int(statistics.median(s.rss_bytes for s in after[-k:]))
    v.rss_baseline_bytes, v.rss_final_bytes = base, final
    v.rss_growth = final / base - 1 if base else math.inf
    if v.rss_growth > rss_limit:
        v.failures.append(
            f"RSS grew {v.rss_growth:+.1%} after the {warmup_s:.0f} s warm-up "
            f"({base / MIB:.1f} -> {final / MIB:.1f} MiB; limit {rss_limit:+.0%})"
        )
    first = after[0]
    if last.fds > first.fds + 16:
        v.warnings.append(f"open file descriptors grew after the warm-up: {first.fds} -> {last.fds}")
    if last.threads > first.threads + 8:
        v.warnings.append(f"threads grew after the warm-up: {first.threads} -> {last.threads}")
    return v


# ---------------------------------------------------------------------------------------------- plot


def plot(path: Path, samples: Sequence[Sample], warmup_s: float, verdict: Verdict, title: str) -> bool:
    """Draw the samples in a PNG of six panels (the ``_plot_*`` helpers take matplotlib Axes as ``ax``).
    Returns False, drawing nothing, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    t = [s.t_s / 60 for s in samples]
    _plot_memory(axes[0][0], t, samples, warmup_s, verdict)
    _plot_process(axes[0][1], t, samples)
    _plot_tiers(axes[1][0], t, samples)
    _plot_outcomes(axes[1][1], t, samples)
    _plot_latency(axes[2][0], t, samples)
    _plot_rates(axes[2][1], t, samples)
    for ax in axes[2]:
        ax.set_xlabel("minutes since the traffic started")
    status = "PASS" if verdict.passed else "FAIL: " + "; ".join(verdict.failures)[:150]
    fig.suptitle(f"{title}\n{status}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_memory(
    ax: Any, t: list[float], samples: Sequence[Sample], warmup_s: float, verdict: Verdict
) -> None:
    ax.plot(t, [s.rss_bytes / MIB for s in samples], marker=".", label="server RSS")
    if verdict.rss_baseline_bytes:
        limit = verdict.rss_baseline_bytes * (1 + RSS_GROWTH_LIMIT) / MIB
        ax.axhline(limit, color="tab:red", linestyle="--", label=f"fail above (+{RSS_GROWTH_LIMIT:.0%})")
    ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_ylabel("MiB")
    ax.set_title("server resident memory (VmRSS)")
    ax.legend(loc="lower right")


def _plot_process(ax: Any, t: list[float], samples: Sequence[Sample]) -> None:
    ax.plot(t, [s.fds for s in samples], marker=".", label="open file descriptors")
    ax.plot(t, [s.threads for s in samples], marker=".", label="threads")
    ax.set_title("server file descriptors and threads")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")


def _plot_tiers(ax: Any, t: list[float], samples: Sequence[Sample]) -> None:
    # Wide and pale under narrow: the tiers often hold the same bytes, and both lines must stay visible.
    host = [s.host_resident_bytes / MIB for s in samples]
    ax.plot(t, host, linewidth=5, alpha=0.4, label="host tier")
    ax.plot(t, [s.device_resident_bytes / MIB for s in samples], marker=".", label="device tier")
    ax.set_ylabel("MiB")
    ax.set_title("resident weight bytes (/metrics) and switches")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(t, [s.loads for s in samples], color="tab:green", linestyle="--", label="switches (cumulative)")
    twin.set_ylabel("switches")
    twin.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right")


def _plot_outcomes(ax: Any, t: list[float], samples: Sequence[Sample]) -> None:
    for name in OUTCOMES:
        ys = [s.outcomes.get(name, 0) for s in samples]
        if any(ys):
            style = "--" if name in FAILURES else "-"
            ax.plot(t, ys, style, marker=".", label=f"{name} ({ys[-1]})")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title("requests by outcome (cumulative; dashed: failures)")
    ax.legend(loc="upper left", fontsize="small")


def _plot_latency(ax: Any, t: list[float], samples: Sequence[Sample]) -> None:
    keys = (("ok_p50_ms", "p50"), ("ok_p99_ms", "p99"), ("ok_max_ms", "max"), ("rt_p99_ms", "real-time p99"))
    for key, label in keys:
        ax.plot(t, [getattr(s, key) for s in samples], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("latency of successful requests per interval (batch class may wait by design)")
    ax.legend(loc="upper left")


def _plot_rates(ax: Any, t: list[float], samples: Sequence[Sample]) -> None:
    pairs = list(zip(samples[:-1], samples[1:], strict=True))
    mids = [(a.t_s + b.t_s) / 120 for a, b in pairs]
    for name, keys in (("all", OUTCOMES), ("ok", ("ok",))):
        rates = [
            sum(b.outcomes.get(k, 0) - a.outcomes.get(k, 0) for k in keys) / max(b.t_s - a.t_s, 1e-9)
            for a, b in pairs
        ]
        ax.step(mids, rates, where="mid", label=f"{name} requests/s")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("requests/s")
    ax.set_title("request rate per interval")
    ax.legend(loc="lower right")


def summary_lines(samples: Sequence[Sample], verdict: Verdict, extra: Mapping[str, object]) -> list[str]:
    """The few lines printed at the end of a run."""
    lines = [f"{k}: {v}" for k, v in extra.items()]
    if samples:
        first, last = samples[0], samples[-1]
        total = sum(last.outcomes.values())
        counts = ", ".join(f"{k} {last.outcomes[k]}" for k in OUTCOMES if last.outcomes.get(k))
        lines.append(f"requests: {total} ({counts})")
        lines.append(
            f"server: RSS {first.rss_bytes / 2**20:.1f} -> {last.rss_bytes / 2**20:.1f} MiB, "
            f"fds {first.fds} -> {last.fds}, threads {first.threads} -> {last.threads}, "
            f"switches {last.loads - first.loads:.0f}, evictions {last.evictions - first.evictions:.0f}"
        )
    if verdict.rss_growth is not None:
        lines.append(
            f"RSS after warm-up: {verdict.rss_baseline_bytes / 2**20:.1f} -> "
            f"{verdict.rss_final_bytes / 2**20:.1f} MiB ({verdict.rss_growth:+.1%})"
        )
    lines += [f"warning: {w}" for w in verdict.warnings]
    lines += [f"FAILED: {f}" for f in verdict.failures]
    lines.append("soak PASSED" if verdict.passed else "soak FAILED")
    return lines
