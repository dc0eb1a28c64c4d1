"""scripts/gpu-check on a machine without a GPU: it explains itself, refuses clearly and quickly, and its
pieces (steps, time limits, summary) work on synthetic results."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


gpu_check = load()
HAS_GPU = gpu_check.gpu_present()[0]


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_it_is_an_executable_python_script() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_help_documents_the_steps_and_exit_statuses(tmp_path: Path) -> None:
    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for text in (
        "--dry-run",
        "--json",
        "--budget-s",
        "Exit status",
        "no NVIDIA GPU",
        "PipeSwitch",
        "tests/gpu",
    ):
        assert text in out.stdout, text


@pytest.mark.parametrize("args", [["--budget-s", "-1"], ["--skip", "nothing"], ["--no-such-flag"]])
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    assert run(*args, cwd=tmp_path).returncode == gpu_check.EXIT_USAGE == 2


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_3_quickly_touching_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    started = time.monotonic()
    out = run(cwd=tmp_path, env=env)
    assert time.monotonic() - started < 10
    assert out.returncode == gpu_check.EXIT_NO_GPU == 3
    assert "no NVIDIA GPU is present" in out.stderr
    assert "nothing was run or installed" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no JSON, no log, no $OUT folder


def test_dry_run_prints_every_command_and_runs_none(tmp_path: Path) -> None:
    out = run("--dry-run", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert out.returncode == 0
    for text in (
        "pytest",
        "tests/gpu",
        "ptmserve.bench.gpu_switch",
        "bench encoder --quick --device cuda",
        "bench switch --quick",
        "ptmserve.bench.standin",
    ):
        assert text in out.stdout, text
    assert not (tmp_path / "r.json").exists()


def test_json_goes_to_out_when_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).json == tmp_path / "gpu-check.json"
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).json == Path("gpu-check.json")


def test_a_present_gpu_without_cuda_torch_exits_4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The probe runs with this (CPU) torch: a GPU the interpreter cannot use is its own status."""
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(gpu_check, "gpu_present", lambda: (True, "pretend"))
    assert gpu_check.main(["--json", str(tmp_path / "r.json"), "--budget-s", "120"]) == 4
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["probe"]["cuda_available"] is False
    assert result["probe"]["modules"]["ptmserve.memory.manager"] == "ok"
    assert not result["passed"]


def test_steps_are_timed_out_and_skipped_within_the_budget(tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--json", str(tmp_path / "r.json"), "--budget-s", "30"])
    runner = gpu_check.Runner(args, tmp_path)
    ok = runner.run(gpu_check.Step("ok", [sys.executable, "-c", "print('hello')"], 20))
    assert (ok.status, ok.rc, ok.tail) == ("passed", 0, ["hello"])
    bad = runner.run(gpu_check.Step("bad", [sys.executable, "-c", "raise SystemExit(5)"], 20))
    assert (bad.status, bad.rc) == ("failed", 5)
    slow = runner.run(gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1))
    assert slow.status == "timed out" and slow.seconds < 10
    runner.deadline = time.monotonic()  # the budget is spent
    assert runner.run(gpu_check.Step("late", ["true"], 20)).status == "skipped"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in saved["steps"]] == ["ok", "bad", "slow", "late"]
    assert "hello" in (tmp_path / "r.log").read_text()


def test_summary_puts_the_pipeswitch_anchor_next_to_our_overhead() -> None:
    results = {
        "passed": True,
        "minilm": "stand-in (random weights, same shapes)",
        "probe": {"gpu": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0+cu130", "python": "3.12.3"},
        "steps": [{"name": "tests", "status": "passed", "seconds": 31.0, "note": ""}],
        "tests": {"passed": 15, "failures": 0, "errors": 0, "skipped": 0, "not_passed": []},
        "encoder": {
            "rows": [
                {
                    "model": "all-MiniLM-L6-v2",
                    "dtype": "bf16",
                    "ours_tokens_per_s": 1e6,
                    "speedup": 2.0,
                    "share_of_peak": 0.1,
                    "max_cosine_gap": 1e-4,
                }
            ]
        },
        "switch": {
            "rows": [{"model": "all-MiniLM-L6-v2", "warm_s": 0.02, "warm_vs_limit": 0.9, "cold_small_s": 0.1}]
        },
        "cuda_switch": {
            "rows": [
                {
                    "dtype": "bfloat16",
                    "pipelined": True,
                    "overhead_ms": 4.2,
                    "limit_ms": 4.0,
                    "h2d_gbps": 55.0,
                }
            ]
        },
    }
    text = "\n".join(gpu_check.summary(results))
    assert "NVIDIA H200" in text and "15 passed" in text and "1,000,000 tok/s" in text
    assert "overhead 4.20 ms (PipeSwitch 3.6-6.6 ms)" in text
    assert "CPU (bench switch has no --device flag yet)" in text
    assert text.endswith("gpu-check PASSED")
    results["encoder"] = {"rows": [{"model": "x"}]}  # a renamed key does not crash the summary
    assert "figures not readable" in "\n".join(gpu_check.summary(results))


def test_junit_counts(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"><failure message="boom"/>'
        '</testcase><testcase classname="a" name="t3"><skipped message="no"/></testcase>'
        '<testcase classname="a" name="t4"/></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(tmp_path / "j.xml")
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (2, 1, 1)
    assert counts["not_passed"][0].startswith("a::t2: failure: boom")
    assert gpu_check.junit_counts(tmp_path / "missing.xml") == {}
