"""The HTTP benchmark's load generator (raw keep-alive client) against the fake engine: results are real."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest

from ptmserve.bench import http as bench
from ptmserve.errors import InvalidInput
from tests.server.fake_engine import fake_vector


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--model", "emb", *extra])


@pytest.mark.parametrize("protocol", ["kserve", "openai"])
def test_raw_sender_gets_real_answers(fake_url: str, protocol: str) -> None:
    make = bench._http_sender(fake_url, _args("--protocol", protocol))
    texts = bench.sentences(40)

    async def go() -> tuple[object, dict]:
        send = make()
        one = await send(texts[0])
        summary = await bench.closed_loop([make() for _ in range(4)], texts)
        return one, summary

    one, summary = asyncio.run(go())
    if protocol == "kserve":
        np.testing.assert_allclose(one.embeddings[0], fake_vector(texts[0]), rtol=1e-6)
    else:
        assert one["data"][0]["index"] == 0
    assert summary["requests"] == 40 and summary["errors"] == 0
    assert summary["p50_ms"] <= summary["p99_ms"] and summary["rps"] > 0


def test_errors_are_counted_not_raised(fake_url: str) -> None:
    make = bench._http_sender(fake_url, _args("--model", "no-such-model"))
    summary = asyncio.run(bench.closed_loop([make()], ["a", "b"]))
    assert summary["errors"] == 2 and summary["requests"] == 0


def test_weights_import_the_temporary_repository_quantized(tmp_path: Path) -> None:
    from ptmserve.store.repository import Repository

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    repo = bench._ensure_repo(parser.parse_args(["--weights", "int8"]), tmp_path)
    assert Repository(repo).manifest(bench.MODEL).weights == "int8"
    with pytest.raises(InvalidInput, match="--weights"):
        bench._ensure_repo(parser.parse_args(["--weights", "int8", "--repo", str(repo)]), tmp_path)
