"""``ptmserve bench generate --weights``: ours in each weight format, with perplexity and greedy
agreement against fp, on a tiny random LLaMA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ptmserve.bench import generate
from ptmserve.bench.generate_models import import_weights, load_decoder, perplexity, prepare
from ptmserve.models.quant import QuantLinear
from ptmserve.store.repository import Repository


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_perplexity_is_transformers_perplexity(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    model = prepare("tiny-llama", tmp_path, repo, torch.float32, seed=0)
    tokens = model.token_stream[:40]
    with torch.no_grad():
        want = float(model.hf(torch.tensor([tokens]), labels=torch.tensor([tokens])).loss.exp())
    assert perplexity(load_decoder(repo, model.name, torch.float32), tokens) == pytest.approx(want, rel=1e-4)
    int8 = load_decoder(repo, import_weights(model, repo, "int8"), torch.float32)
    assert any(isinstance(m, QuantLinear) for m in int8.modules())
    assert perplexity(int8, tokens) == pytest.approx(want, rel=0.05)  # close, not equal


def test_weight_formats_run_as_systems_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(
        "--quick", "--models", "tiny-llama", "--weights", "int8,fp", "--systems", "ours",
        "--parity-prompts", "0", "--concurrency", "1", "--requests", "2", "--workdir", str(tmp_path),
    )  # fmt: skip
    result = generate.run(args)
    json.dumps(result)
    assert result["weights"] == ["fp", "int8"]
    (row,) = result["models"]
    (level,) = row["levels"]
    assert {"ours", "ours-int8"} <= set(level) and "transformers" not in level
    assert level["ours"]["generated_tokens"] == level["ours-int8"]["generated_tokens"]
    assert set(row["weights"]) == {"fp", "int8"}
    fp, int8 = row["weights"]["fp"], row["weights"]["int8"]
    assert fp["identical_to_fp"] == fp["prompts"] and fp["prefix_agreement"] == 1.0
    assert 0.0 <= int8["prefix_agreement"] <= 1.0 and int8["perplexity"] > 0
    out = capsys.readouterr().out
    assert "| weights |" in out and "| int8 |" in out
    assert any("ours-int8 at concurrency 1" in t["target"] for t in result["targets"])


def test_an_unknown_weight_format_is_refused() -> None:
    with pytest.raises(SystemExit, match="--weights"):
        generate.Plan.from_args(_args("--weights", "fp,int3"))
