"""The request lifecycle on the real engine with tiny models: split requests, no head-of-line blocking,
admission and deadlines decided at once, cancellation, damaged manifests, and a loop that cannot die."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ptmserve import errors
from ptmserve.engine.api import InferenceOptions, ModelState
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint

TOKENS_PER_INPUT = 64
BIG_INPUTS = 1016  # 65,024 tokens: eight steps under the default 8192-token limit
RT = InferenceOptions(priority=1, timeout_us=30_000_000)


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("ckpt")
    root = tmp_path_factory.mktemp("repo")
    repo = Repository(root)
    for name, seed in (("big", 1), ("rt", 2), ("other", 3)):
        folder = make_tiny_checkpoint(src, "bert", seed=seed, name=name, max_tokens=TOKENS_PER_INPUT)
        import_checkpoint(repo, folder, name, dtype="float32")
    return root


def open_engine(root: Path, **settings: object) -> Engine:
    return Engine(Repository(root), EngineSettings(dtype="float32", **settings))  # type: ignore[arg-type]


@pytest.fixture
def engine(repo_dir: Path) -> Iterator[Engine]:
    with open_engine(repo_dir) as engine:
        yield engine


def big_inputs(n: int = BIG_INPUTS) -> list[list[int]]:
    return [[2 + (i * 7 + j) % 90 for j in range(TOKENS_PER_INPUT)] for i in range(n)]


def long_step_inputs(engine: Engine, seconds: float = 1.0) -> list[list[int]]:
    """Inputs that keep ``engine`` (with a large token limit) busy for about ``seconds`` in one step,
    whatever this machine's speed: one calibration run, then scaled."""
    t0 = time.perf_counter()
    engine.embed("big", big_inputs(), InferenceOptions(priority=2))
    took = time.perf_counter() - t0
    return big_inputs(max(BIG_INPUTS, int(BIG_INPUTS * seconds / max(took, 1e-3))))


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:  # noqa: ANN001
    """Run ``fn(*args)`` in a thread; the dict gets ``result`` or ``error`` and ``seconds``."""
    out: dict = {}

    def run() -> None:
        t0 = time.perf_counter()
        try:
            out["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["seconds"] = time.perf_counter() - t0
        out["done_at"] = time.perf_counter()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_running(engine: Engine, model: str, seconds: float = 20.0) -> None:
    """Until ``model`` has a request in the running set (its first step started)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(r.model == model for r in list(engine._scheduler.running.values())):
            return
        time.sleep(0.002)
    raise AssertionError(f"no request of {model} started running")


@pytest.mark.slow
def test_a_65k_token_request_does_not_block_real_time_work_of_another_model(engine: Engine) -> None:
    engine.embed("rt", ["warm"], RT)
    engine.embed("big", [[2, 3, 4]], RT)
    ids = big_inputs()
    big, big_out = in_thread(engine.embed, "big", ids, InferenceOptions(priority=2, timeout_us=300_000_000))
    wait_running(engine, "big")
    t0 = time.perf_counter()
    rt = engine.embed("rt", ["the man said hello"], RT)
    rt_seconds = time.perf_counter() - t0
    rt_done = time.perf_counter()
    big.join(120)
    assert "error" not in big_out, big_out.get("error")
    assert rt.embeddings.shape == (1, 32)
    assert rt_seconds < 1.0, f"the real-time request waited {rt_seconds:.3f} s"
    assert rt_done < big_out["done_at"], "the real-time request waited for the whole large request"
    steps = engine.metrics.batch_size.labels("big")._sum.get()  # one request per step of its own
    assert steps >= 1 + BIG_INPUTS * TOKENS_PER_INPUT // 8192  # the warm-up step, then eight parts
    alone = engine.embed("big", ids, InferenceOptions(priority=2, timeout_us=300_000_000))
    got = big_out["result"].embeddings
    assert got.shape == (BIG_INPUTS, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, alone.embeddings)
    assert big_out["result"].prompt_tokens == BIG_INPUTS * TOKENS_PER_INPUT


def test_a_burst_over_the_queue_limit_gets_its_429s_at_once(repo_dir: Path) -> None:
    with open_engine(repo_dir, max_queue=2, max_batch_tokens=1 << 30) as engine:
        engine.embed("rt", ["warm"], RT)
        long, _ = in_thread(engine.embed, "big", long_step_inputs(engine), InferenceOptions(priority=2))
        wait_running(engine, "big")
        futures, refusals = [], []
        for _ in range(64):
            t0 = time.perf_counter()
            try:
                futures.append(engine._submit("rt", ["a new day"], RT, classify=False))
            except errors.Overloaded:
                refusals.append(time.perf_counter() - t0)
        assert len(futures) == 2 and len(refusals) == 62
        assert max(refusals) < 0.05, f"slowest 429 took {max(refusals) * 1e3:.1f} ms"
        long.join(120)
        assert all(f.result(60).embeddings.shape == (1, 32) for f in futures)


def test_a_200ms_deadline_behind_a_long_step_gets_its_504_within_250ms(repo_dir: Path) -> None:
    with open_engine(repo_dir, max_batch_tokens=1 << 30) as engine:
        engine.embed("rt", ["warm"], RT)
        inputs = long_step_inputs(engine)
        long, long_out = in_thread(engine.embed, "big", inputs, InferenceOptions(priority=2))
        wait_running(engine, "big")
        t0 = time.perf_counter()
        with pytest.raises(errors.DeadlineExceeded):
            engine.embed("rt", ["a new day"], InferenceOptions(priority=1, timeout_us=200_000))
        waited = time.perf_counter() - t0
        still_running = "done_at" not in long_out
        long.join(120)
        assert 0.19 <= waited < 0.25, f"the 504 came after {waited * 1e3:.0f} ms"
        assert still_running, "the long step ended before the deadline: the test proved nothing"
        assert "error" not in long_out
        assert engine.metrics.requests.labels("rt", "timeout")._value.get() == 1


def test_a_cancelled_request_frees_its_queue_slot_at_once(repo_dir: Path) -> None:
    with open_engine(repo_dir, max_queue=1, max_batch_tokens=1 << 30) as engine:
        engine.embed("rt", ["warm"], RT)
        long, _ = in_thread(engine.embed, "big", long_step_inputs(engine), InferenceOptions(priority=2))
        wait_running(engine, "big")

        async def cancel_then_resubmit() -> np.ndarray:
            task = asyncio.ensure_future(engine.aembed("rt", ["the man said hello"], RT))
            await asyncio.sleep(0.05)  # prepared and queued behind the long step
            assert engine._scheduler.pending() == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine._scheduler.pending() == 0  # the slot is free now, while the long step runs
            again = await engine.aembed("rt", ["a new day"], RT)  # admitted, not 429
            return again.embeddings

        assert asyncio.run(cancel_then_resubmit()).shape == (1, 32)
        long.join(120)
        assert engine.metrics.requests.labels("rt", "cancelled")._value.get() == 1


def test_damaged_and_deleted_manifests_fail_alone(tmp_path: Path, repo_dir: Path) -> None:
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(repo_dir, root)
    with open_engine(root) as engine:
        for name in ("big", "rt", "other"):
            engine.embed(name, ["warm"], RT)
        (root / "manifests" / "big.json").write_text("{ this is not json")
        (root / "manifests" / "other.json").unlink()
        engine.catalog.refresh(force=True)
        with pytest.raises(errors.CorruptData, match="manifest of model 'big' is not valid JSON") as exc:
            engine.embed("big", ["hello"], RT)
        assert str(root) not in exc.value.message
        with pytest.raises(errors.ModelNotFound):
            engine.embed("other", ["hello"], RT)
        infos = {m.name: m for m in engine.models()}
        assert set(infos) == {"big", "rt"}
        assert infos["big"].state is ModelState.UNAVAILABLE and "not valid JSON" in infos["big"].reason
        assert engine.embed("rt", ["the man said hello"], RT).embeddings.shape == (1, 32)
        assert engine.ready()


def test_a_scheduling_error_fails_the_queued_requests_and_the_next_ones_succeed(engine: Engine) -> None:
    engine.embed("rt", ["warm"], RT)
    policy = engine._scheduler.policy
    real_plans = policy.plans
    calls = {"n": 0}

    def broken_once(ctx):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected scheduler bug")
        return real_plans(ctx)

    policy.plans = broken_once  # type: ignore[method-assign]
    try:
        with pytest.raises(errors.PtmError, match="internal error while scheduling"):
            engine.embed("rt", ["a new day"], RT)
        assert engine.embed("rt", ["a new day"], RT).embeddings.shape == (1, 32)
        assert engine.ready()
    finally:
        policy.plans = real_plans  # type: ignore[method-assign]


def test_a_failing_step_fails_its_requests_and_the_next_ones_succeed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptmserve.models.encoder import Encoder

    engine.embed("rt", ["warm"], RT)
    real = Encoder.run_layer
    calls = {"n": 0}

    def broken_once(self, i, hidden, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel bug")
        return real(self, i, hidden, batch)

    monkeypatch.setattr(Encoder, "run_layer", broken_once)
    with pytest.raises(errors.PtmError, match="internal error while running model 'rt'"):
        engine.embed("rt", ["a new day"], RT)
    assert engine.embed("rt", ["a new day"], RT).embeddings.shape == (1, 32)
    assert engine.metrics.requests.labels("rt", "error")._value.get() == 1


def test_a_crashed_loop_is_restarted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.embed("rt", ["warm"], RT)
    worker = engine._worker
    real = worker._complete
    calls = {"n": 0}

    def crash_once(step, output):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected loop bug")
        return real(step, output)

    monkeypatch.setattr(worker, "_complete", crash_once)
    with pytest.raises(errors.PtmError, match="internal error"):
        engine.embed("rt", ["a new day"], RT)
    assert engine.embed("rt", ["a new day"], RT).embeddings.shape == (1, 32)
    assert engine.ready() and worker.failure is None


def test_tokenizing_does_not_block_the_event_loop(engine: Engine) -> None:
    engine.embed("rt", ["warm"], RT)
    texts = [("the man said hello " * 600)[:10_000] for _ in range(256)]

    async def measure() -> tuple[float, float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        result = await engine.aembed("rt", texts, InferenceOptions(priority=2, timeout_us=120_000_000))
        took = time.perf_counter() - t0
        done.set()
        await tick
        assert result.embeddings.shape == (256, 32)
        return max(gaps), took

    worst_gap, took = asyncio.run(measure())
    assert worst_gap < 0.05, f"the event loop stalled {worst_gap * 1e3:.0f} ms (request took {took:.2f} s)"


def test_a_loop_that_keeps_crashing_turns_readiness_off_with_the_reason(
    repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_engine(repo_dir) as engine:
        engine.embed("rt", ["warm"], RT)
        worker = engine._worker

        def always_crash(step, output):  # noqa: ANN001, ANN202
            raise RuntimeError("injected persistent loop bug")

        monkeypatch.setattr(worker, "_complete", always_crash)
        for _ in range(3):
            with pytest.raises(errors.PtmError):
                engine.embed("rt", ["a new day"], RT)
        deadline = time.monotonic() + 5
        while engine.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.ready()
        assert "crashed 3 times" in (engine.unready_reason() or "")
        with pytest.raises(errors.NotReady, match="crashed"):
            engine.embed("rt", ["a new day"], RT)  # refused at once, never left hanging
