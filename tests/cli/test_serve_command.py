"""``ptmserve serve``: its flags, its refusals of bad ones, and one real start, request and SIGTERM."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.cli.conftest import Run, run_cli
from tests.server.conftest import serve_process

# Every flag of README.md's `ptmserve serve` table.
FLAGS = (
    "--repo",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--device-memory",
    "--host-memory",
    "--policy",
    "--model-control",
    "--no-pipeline",
    "--zero-copy",
    "--max-batch-tokens",
    "--max-queue",
    "--api-key",
    "--max-body-bytes",
    "--max-batch-inputs",
    "--max-input-length",
    "--long-inputs",
    "--drain-seconds",
    "--weights",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """A repository holding ``emb``, imported with the command itself."""
    root = tmp_path_factory.mktemp("serve-repo")
    run = run_cli("import", checkpoints["emb"], "--name", "emb", "--repo", root)
    assert run.code == 0, run.err
    return root


@pytest.fixture
def never_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``serve`` fail instead of blocking, should a bad flag get past validation."""
    import ptmserve.server.serve

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ptmserve serve started serving with a bad flag")

    monkeypatch.setattr(ptmserve.server.serve, "serve", refuse)
    yield


def test_help_lists_every_flag(cli: Callable[..., Run]) -> None:
    run = cli("serve", "--help")
    assert run.code == 0, run.err
    missing = [f for f in FLAGS if not re.search(rf"(^|\s|\[){re.escape(f)}\b", run.out)]
    assert not missing, f"serve --help does not list {missing}:\n{run.out}"


def test_top_level_help_lists_every_command(cli: Callable[..., Run]) -> None:
    run = cli("--help")
    assert run.code == 0
    for command in ("import", "import-embedded", "models", "verify", "serve", "bench"):
        assert re.search(rf"^\s+{re.escape(command)}\s", run.out, re.M), (command, run.out)
    run = cli()
    assert run.code == 2 and "required: command" in run.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--port", "abc"), "argument --port: invalid int value: 'abc'"),
        (("--policy", "nope"), "argument --policy: invalid choice: 'nope'"),
        (("--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
        (("--model-control", "manual"), "argument --model-control: invalid choice: 'manual'"),
        (("--long-inputs", "cut"), "argument --long-inputs: invalid choice: 'cut'"),
        (("--max-queue", "many"), "argument --max-queue: invalid int value: 'many'"),
        (("--device-memory", "12XB"), "12XB"),
        (("--host-memory", "lots"), "lots"),
        (("--port", "70000"), "port 70000 is not in 0..65535"),
        (("--max-batch-inputs", "0"), "max_batch_inputs must be >= 1, got 0"),
        (("--drain-seconds", "-1"), "drain_seconds must be >= 0, got -1"),
        (("--api-key", "two words"), "api_key must be a non-empty string without whitespace"),
    ],
)
def test_bad_flags_fail_clearly(
    repo: Path, cli: Callable[..., Run], never_serve: None, flags: tuple[str, ...], message: str
) -> None:
    run = cli("serve", "--repo", repo, *flags)
    assert run.code == 2, run
    assert message in run.err, run.err
    assert "Traceback" not in run.err


@pytest.mark.slow
def test_bad_size_fails_clearly_as_a_process(repo: Path) -> None:
    run = run_cli("serve", "--repo", repo, "--port", "0", "--device-memory", "12XB", timeout=120)
    assert run.code == 2, run
    error = [line for line in run.err.splitlines() if line.startswith("error: ")]
    assert error and "12XB" in error[0], run.err
    assert "Traceback" not in run.err


@pytest.mark.slow
def test_serve_answers_then_stops_on_sigterm(repo: Path, tmp_path: Path) -> None:
    from ptmserve.engine.engine import Engine

    flags = ("--dtype", "float32", "--api-key", "k3y", "--max-batch-inputs", "2", "--drain-seconds", "2")
    with serve_process(repo, tmp_path / "serve.log", *flags) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/v2/health/ready").status_code == 200  # health needs no key
            assert c.post("/v1/embeddings", json={"model": "emb", "input": "hello"}).status_code == 401
            key = {"Authorization": "Bearer k3y"}
            r = c.post(
                "/v1/embeddings",
                json={
                    "model": "emb",
                    "input": ["a new day", "the man said hello"],
                    "encoding_format": "float",
                },
                headers=key,
            )
            assert r.status_code == 200, r.text
            got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            r = c.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b", "c"]}, headers=key)
            assert r.status_code == 413 and "the limit is 2" in r.json()["error"]["message"], r.text
        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(timeout=60)
        log = server.output()
    assert returncode in (0, -signal.SIGTERM), log[-3000:]
    assert "serving from" in log and "in float32: emb" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    with Engine.open(repo, dtype="float32") as engine:
        want = engine.embed("emb", ["a new day", "the man said hello"]).embeddings
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_serve_with_int8_weights_serves_the_quantized_variant(repo: Path, tmp_path: Path) -> None:
    from ptmserve.engine.engine import Engine
    from ptmserve.store.repository import Repository
    from ptmserve.store.variants import variant_root

    texts = ["a new day", "the man said hello"]
    with serve_process(repo, tmp_path / "serve.log", "--dtype", "float32", "--weights", "int8") as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"model": "emb", "input": texts, "encoding_format": "float"})
            assert r.status_code == 200, r.text
        log = server.output()
    got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert "int8 weights: emb" in log, log[-3000:]
    assert Repository(variant_root(repo, "int8")).manifest("emb").weights == "int8"
    assert Repository(repo).manifest("emb").weights == "fp"  # the source is untouched
    with Engine.open(repo, dtype="float32") as engine:
        want = engine.embed("emb", texts).embeddings
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99, cos
