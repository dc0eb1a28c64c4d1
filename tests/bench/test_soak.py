"""The soak test's verdict, counters and parsers on synthetic data, and one short real run (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from ptmserve.bench import soak_report, soak_traffic
from ptmserve.bench.soak_report import Sample, judge, warmup_seconds

MiB = 2**20


def samples(rss_mib: list[float], step_s: float = 10.0, **outcomes: int) -> list[Sample]:
    """One sample per RSS value, ``step_s`` apart; outcome counts grow to ``outcomes`` at the last."""
    n = len(rss_mib)
    out = []
    for i, rss in enumerate(rss_mib):
        counts = {k: round(v * (i + 1) / n) for k, v in {"ok": 100, **outcomes}.items()}
        out.append(
            Sample(
                t_s=i * step_s,
                rss_bytes=int(rss * MiB),
                fds=30,
                threads=20,
                host_resident_bytes=40.0 * MiB,
                device_resident_bytes=20.0 * MiB,
                loads=float(i * 3),
                evictions=float(i * 2),
                ok_p50_ms=5.0,
                ok_p99_ms=20.0,
                ok_max_ms=40.0,
                rt_p99_ms=10.0,
                outcomes=counts,
            )
        )
    return out


def test_warmup_is_five_minutes_or_half_a_short_run() -> None:
    assert warmup_seconds(30 * 60) == 300
    assert warmup_seconds(10 * 60) == 300
    assert warmup_seconds(120) == 60
    assert warmup_seconds(30) == 15


def test_a_flat_run_passes() -> None:
    v = judge(samples([300, 400, 410, 405, 408, 409, 410]), warmup_s=20)
    assert v.passed, v.failures
    # After 20 s: 410 405 408 409 410; k = 2: baseline median(410, 405), final median(409, 410).
    # The growth from 300 before the warm-up is not judged.
    assert v.rss_baseline_bytes == int(407.5 * MiB) and v.rss_final_bytes == int(409.5 * MiB)


def test_rss_growth_over_the_limit_after_the_warm_up_fails() -> None:
    v = judge(samples([300, 400, 400, 400, 420, 440, 460, 480, 500]), warmup_s=10)
    assert not v.passed
    assert any("RSS grew" in f for f in v.failures), v.failures
    assert v.rss_growth == pytest.approx(480 / 400 - 1)  # medians of the first and last three


def test_growth_just_under_the_limit_passes_and_just_over_fails() -> None:
    assert judge(samples([400, 400, 400, 400, 439, 439, 439]), warmup_s=0).passed
    assert not judge(samples([400, 400, 400, 400, 441, 441, 441]), warmup_s=0).passed
    assert judge(samples([400, 400, 400, 400, 441, 441, 441]), warmup_s=0, rss_limit=0.2).passed


def test_one_high_reading_at_either_end_does_not_fail_alone() -> None:
    assert judge(samples([400, 400, 400, 400, 400, 400, 600]), warmup_s=10).passed
    assert judge(samples([400, 330, 400, 400, 400, 400, 400]), warmup_s=10).passed


@pytest.mark.parametrize("outcome", soak_traffic.FAILURES)
def test_any_failure_outcome_fails(outcome: str) -> None:
    v = judge(samples([400] * 6, **{outcome: 1}), warmup_s=10)
    assert not v.passed
    assert any(outcome in f for f in v.failures), v.failures


@pytest.mark.parametrize("outcome", ["rejected", "overloaded", "deadline", "cancelled", "disconnected"])
def test_expected_outcomes_pass(outcome: str) -> None:
    assert judge(samples([400] * 6, **{outcome: 50}), warmup_s=10).passed


def test_no_success_fails_and_no_samples_fail() -> None:
    s = samples([400] * 4)
    for x in s:
        x.outcomes["ok"] = 0
    assert "no request succeeded" in judge(s, warmup_s=0).failures
    assert not judge([], warmup_s=0).passed


def test_a_run_shorter_than_its_warm_up_warns_instead_of_judging_rss() -> None:
    v = judge(samples([100, 200, 400]), warmup_s=1000)
    assert v.passed and v.rss_growth is None
    assert any("no RSS verdict" in w for w in v.warnings)


def test_no_switching_and_fd_growth_warn() -> None:
    s = samples([400] * 6)
    for x in s:
        x.loads = 5.0
    s[-1].fds = 200
    v = judge(s, warmup_s=10)
    assert v.passed
    assert any("no model was switched" in w for w in v.warnings)
    assert any("file descriptors grew" in w for w in v.warnings)


def test_status_outcomes() -> None:
    f = soak_traffic.status_outcome
    assert f(200, good=True) == "ok"
    assert f(400, good=True) == "unexpected_status"
    assert f(400, good=False, expected=frozenset({400})) == "rejected"
    assert f(404, good=False, expected=frozenset({400})) == "unexpected_status"
    assert f(200, good=False, expected=frozenset({400})) == "unexpected_status"
    assert f(500, good=False) == "server_error" and f(502, good=True) == "server_error"
    assert (f(429, good=True), f(503, good=False), f(504, good=True)) == (
        "overloaded",
        "not_ready",
        "deadline",
    )


def test_tally_keeps_a_few_examples_of_failures_only() -> None:
    t = soak_traffic.Tally()
    for i in range(15):
        t.add("kserve_embed", "server_error", 500, f"boom {i}")
    t.add("kserve_embed", "ok", 200)
    assert t.total == 16 and t.outcomes["server_error"] == 15
    assert len(t.examples["server_error"]) == 10 and "ok" not in t.examples
    assert t.statuses["kserve_embed 500"] == 15


def test_checks_of_answers() -> None:
    check = soak_traffic._check_kserve(2, {"EMBEDDING": 3, "LABEL": 0})
    good = {
        "outputs": [
            {"name": "EMBEDDING", "shape": [2, 3], "data": [0.0] * 6},
            {"name": "LABEL", "shape": [2], "data": ["a", "b"]},
        ]
    }
    assert check(good) is None
    good["outputs"][0]["data"] = [0.0] * 5
    assert "shape" in check(good)
    good["outputs"][0]["data"] = [0.0] * 5 + [math.nan]
    assert "non-finite" in check(good)
    openai = soak_traffic._check_openai(1, 2, b64=False)
    assert openai({"data": [{"index": 0, "embedding": [1.0, 2.0]}]}) is None
    assert openai({"data": []}) is not None


def test_metrics_and_csv_round_trip(tmp_path: Path) -> None:
    text = (
        'ptmserve_resident_bytes{tier="host"} 1.5e+07\n'
        'ptmserve_resident_bytes{tier="device"} 7.0e+06\n'
        'ptmserve_model_loads_total{model="a"} 3.0\nptmserve_model_loads_total{model="b"} 4.0\n'
        'ptmserve_model_evictions_total{model="a",tier="device"} 2.0\n'
    )
    m = soak_report.read_metrics(text)
    assert m == {"host_resident_bytes": 1.5e7, "device_resident_bytes": 7e6, "loads": 7.0, "evictions": 2.0}
    assert math.isnan(soak_report.read_metrics("")["host_resident_bytes"])
    s = samples([400, 410, 420], cancelled=3)
    soak_report.write_csv(tmp_path / "s.csv", s)
    assert [r.row() for r in soak_report.read_csv(tmp_path / "s.csv")] == [r.row() for r in s]


def test_latency_figures() -> None:
    figures = soak_report.latency_ms([0.001 * i for i in range(1, 101)], [0.002, 0.004])
    assert figures == {"ok_p50_ms": 51.0, "ok_p99_ms": 100.0, "ok_max_ms": 100.0, "rt_p99_ms": 4.0}
    assert all(math.isnan(v) for v in soak_report.latency_ms([]).values())


def test_tally_collects_latencies_of_successes_and_real_time_ones_apart() -> None:
    t = soak_traffic.Tally()
    t.add("kserve_embed", "ok", 200, seconds=0.5, note="m inputs=1 priority=1")
    t.add("kserve_embed", "ok", 200, seconds=0.1, note="m inputs=1 priority=2")
    t.add("bad_x", "rejected", 400, seconds=0.01)
    assert t.take_latencies() == ([0.1, 0.5], [0.5])
    assert t.take_latencies() == ([], [])
    assert t.slowest[0] == (0.5, "kserve_embed HTTP 200 m inputs=1 priority=1")


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    s = samples([400, 410, 420, 415], cancelled=3, server_error=1)
    v = judge(s, warmup_s=10)
    assert soak_report.plot(tmp_path / "p.png", s, 10, v, "test")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_read_proc_of_this_process() -> None:
    import os

    rss, fds, threads = soak_report.read_proc(os.getpid())
    assert rss > 10 * MiB and fds >= 3 and threads >= 1


@pytest.mark.slow
def test_a_short_soak_against_a_real_server(tmp_path: Path) -> None:
    """25 s of traffic sampled every 4 s: the CSV has rows, every request has an outcome, it passes."""
    import subprocess

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "ptmserve.bench.soak",
        "--minutes",
        "0.42",
        "--interval-s",
        "4",
        "--out",
        str(out),
        "--minilm",
        "no",
        "--hidden",
        "64",
        "--rate",
        "15",
        "--workers",
        "4",
        "--workdir",
        str(tmp_path),
        "--rss-limit",
        "0.25",  # 12 s of warm-up is short; the RSS verdict itself is tested on synthetic rows above
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = soak_report.read_csv(out / "soak.csv")
    assert len(rows) >= 6  # one at the start, about six while the traffic runs, one after it
    assert [r.t_s for r in rows] == sorted(r.t_s for r in rows)
    last = rows[-1].outcomes
    assert last["ok"] > 50 and last["rejected"] > 0
    assert last["cancelled"] + last["disconnected"] > 0
    assert all(last[k] == 0 for k in soak_traffic.FAILURES)
    assert rows[-1].loads > rows[0].loads  # the budget forced switching
    doc = json.loads((out / "soak.json").read_text())
    assert doc["passed"] and doc["samples"] == len(rows)
    assert "soak PASSED" in proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:  # the `soak` extra
        assert (out / "soak.png").stat().st_size > 10_000
