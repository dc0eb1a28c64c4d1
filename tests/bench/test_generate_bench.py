"""``ptmserve bench generate``: a quick run on tiny random models (the real engine, our static-batch
ablation and transformers), the closed-loop client's timing against a fake engine, and the report."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ptmserve.bench import generate
from ptmserve.bench.generate_models import load_decoder, prepare
from ptmserve.bench.generate_report import format_report, targets
from ptmserve.bench.generate_systems import Request, make_requests, run_engine, run_hf, run_static, summarize
from ptmserve.engine.api import Generation, GenerationChunk, GenerationResult
from ptmserve.errors import Overloaded
from ptmserve.store.repository import Repository

FIGURES = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_run_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--quick", "--models", "tiny-gpt2,tiny-llama", "--workdir", str(tmp_path))
    result = generate.run(args)
    json.dumps(result)  # JSON-ready as it is
    assert {"cpu", "cpus", "threads", "torch", "transformers", "dtype", "workload", "engine"} <= set(result)
    assert result["dtype"] == "float32"
    assert [m["key"] for m in result["models"]] == ["tiny-gpt2", "tiny-llama"]
    want_tokens = None
    for row in result["models"]:
        assert [lv["concurrency"] for lv in row["levels"]] == [1, 4]
        for lv in row["levels"]:
            counts = {s: lv[s]["generated_tokens"] for s in ("ours", "static", "transformers")}
            assert len(set(counts.values())) == 1, counts  # every system generated exactly the same tokens
            for system in ("ours", "static", "transformers"):
                figures = lv[system]
                assert figures["errors"] == 0
                assert all(figures[k] is not None and figures[k] >= 0 for k in FIGURES), figures
            assert lv["ours_over_transformers"] > 0 and lv["ours_over_static"] > 0
        want_tokens = want_tokens or row["levels"][0]["ours"]["generated_tokens"]
        assert row["parity"]["share"] == 1.0, row["parity"]  # tiny float32 models: every token identical
        assert "skipped" in row["llama_cpp"] or "tokens_per_s" in row["llama_cpp"]
    names = [t["target"] for t in result["targets"]]
    assert any("2x transformers" in n for n in names) and any("TTFT p99" in n for n in names)
    out = capsys.readouterr().out
    assert "PASS" in out or "MISS" in out
    assert "concurrency 4, ours" in out  # progress lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("gen")
    repo = Repository(work / "repo")
    model = prepare("tiny-llama", work, repo, torch.float32, seed=0)
    return model, load_decoder(repo, model.name, torch.float32)


def test_static_ablation_decodes_like_transformers_without_padding(tiny: Any) -> None:
    model, decoder = tiny
    reqs = make_requests(model.token_stream, 6, (12, 12), (5, 9), model.max_positions, seed=3)
    static, _ = run_static(decoder, reqs, 3)
    hf, _ = run_hf(model.hf, reqs, 3)
    assert [t.token_ids for t in static] == [t.token_ids for t in hf]
    assert [len(t.tokens) for t in static] == [r.max_new for r in reqs]
    assert [t.warmup for t in static] == [True] * 3 + [False] * 3  # the first batch: each client's first


def test_static_ablation_pads_prompts_of_different_lengths(tiny: Any) -> None:
    model, decoder = tiny
    reqs = make_requests(model.token_stream, 5, (4, 40), (3, 20), model.max_positions, seed=4)
    traces, wall = run_static(decoder, reqs, 4)
    assert [len(t.tokens) for t in traces] == [r.max_new for r in reqs]
    assert summarize(traces, wall)["generated_tokens"] == sum(r.max_new for r in reqs)


class _FakeEngine:
    """Streams ``max_tokens`` tokens two per chunk, 2 ms apart; a prompt starting with 999 is refused."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def complete(self, model: str, prompt: list[int], params: Any, options: Any) -> Generation:
        if prompt[0] == 999:
            raise Overloaded("queue full")
        gen = Generation(len(prompt))
        n = params.max_tokens

        def produce() -> None:
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            for i in range(0, n, 2):
                time.sleep(0.002)
                gen.push(GenerationChunk("x", tuple(range(i, min(i + 2, n)))))
            with self._lock:
                self.active -= 1
            result = GenerationResult("x", tuple(range(n)), "length", len(prompt), n, 0.002)
            gen.future.set_result(result)

        threading.Thread(target=produce, daemon=True).start()
        return gen


def test_closed_loop_clients_time_every_token() -> None:
    engine = _FakeEngine()
    reqs = [Request((1, 2, 3), 6) for _ in range(7)] + [Request((999,), 4)]
    traces, wall = run_engine(engine, "m", reqs, 3, timeout_s=5.0)
    assert engine.peak <= 3
    assert sum(t.warmup for t in traces) == 3  # one first request per client
    ok = [t for t in traces if not t.error]
    assert len(ok) == 7 and "Overloaded" in traces[-1].error
    for t in ok:
        assert len(t.tokens) == 6 and t.token_ids == tuple(range(6))
        assert t.tokens == sorted(t.tokens) and t.tokens[0] > t.submit
        gaps = [b - a for a, b in zip(t.tokens, t.tokens[1:], strict=False)]
        assert gaps[0] == 0.0  # the first chunk's two tokens came together
        assert gaps[1] == pytest.approx(gaps[2])  # a later chunk's gap is split evenly
    figures = summarize(traces, wall)
    assert figures["errors"] == 1 and figures["generated_tokens"] == 42
    assert figures["latency_requests"] == 7 - sum(t.warmup for t in ok)


def test_targets_and_report() -> None:
    def level(c: int, ours: float, hf: float, ttft50: float, ttft99: float) -> dict[str, Any]:
        f = dict(requests=4, errors=0, tokens_per_s=ours, ttft_p50_ms=ttft50, ttft_p99_ms=ttft99)
        f.update(itl_p50_ms=1.0, itl_p99_ms=2.0)
        return {"concurrency": c, "ours": f, "transformers": {**f, "tokens_per_s": hf}}

    result = {
        "workload": {"concurrency": [1, 16], "prompt_tokens": [16, 512], "generated_tokens": [64, 128]},
        "dtype": "float32",
        "threads": 2,
        "cpus": 2,
        "cpu": "test cpu",
        "models": [
            {
                "model": "m",
                "levels": [
                    {
                        **level(1, 100.0, 50.0, 10.0, 12.0),
                        "ours_over_transformers": 2.0,
                        "ours_over_static": 1,
                    },
                    {
                        **level(16, 300.0, 200.0, 20.0, 40.0),
                        "ours_over_transformers": 1.5,
                        "ours_over_static": 1,
                    },
                ],
                "llama_cpp": {"skipped": "not installed"},
                "parity": {"prompts": 64, "new_tokens": 32, "identical": 63, "share": 63 / 64},
            }
        ],
    }
    result["targets"] = found = targets(result)
    met = {t["target"]: (t["met"], t["ratio"]) for t in found}
    assert met["ours >= 2x transformers tokens/s at concurrency 16"] == (False, 1.5)
    assert met["ours >= 1.2x transformers tokens/s at concurrency 1"] == (True, 2.0)
    assert met["TTFT p99 at concurrency 16 <= 3x TTFT p50 at concurrency 1"] == (False, 4.0)
    assert met["greedy tokens identical to transformers on >= 95% of prompts"] == (True, 63 / 64)
    assert not any("llama.cpp" in t for t in met)  # skipped: no target row
    text = format_report(result)
    assert "MISS m: ours >= 2x transformers tokens/s at concurrency 16: 1.50" in text
    assert "PASS m: ours >= 1.2x transformers tokens/s at concurrency 1: 2.00" in text
    assert "llama.cpp: skipped (not installed)" in text
    assert "greedy parity: 63/64 prompts identical over 32 tokens" in text
