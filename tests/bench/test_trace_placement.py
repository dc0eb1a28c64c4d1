"""``ptmserve bench trace --placement``: every policy once per placement on the same trace and device budget,
each model taking its device bytes as placed (sim in a second or two; real mode marked slow)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ptmserve.bench import trace, trace_real
from ptmserve.engine.policies import PolicyName
from ptmserve.errors import InvalidInput
from ptmserve.models.encoder import Encoder


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    trace.add_arguments(parser)
    return parser.parse_args(list(argv))


def _embedding_share() -> float:
    with torch.device("meta"):
        params = dict(Encoder(trace_real.MINILM).named_parameters())
    total = sum(p.numel() for p in params.values())
    return sum(p.numel() for n, p in params.items() if n.startswith("embeddings.")) / total


def test_sim_runs_every_policy_under_each_placement_with_bytes_as_placed() -> None:
    args = _args(
        "--models", "8", "--device-models", "2", "--duration", "30",
        "--placement", "device,host-embeddings", "--host-share", "0.5",
    )  # fmt: skip
    report = json.loads(json.dumps(trace.run(args)))  # what --json writes
    device, placed = report["placements"]["device"], report["placements"]["host-embeddings"]
    assert report["placement"] == "device" and report["policies"] == device["policies"]  # old keys kept
    assert report["vs_fifo_lru"] == device["vs_fifo_lru"]
    full = report["model_bytes"]
    assert device["model_bytes"] == full and placed["model_bytes"] == round(full * 0.5)
    assert device["device_budget_bytes"] == placed["device_budget_bytes"] == 2 * full  # the same budget
    assert (device["models_resident"], placed["models_resident"]) == (2, 4)
    assert set(placed["policies"]) == {p.value for p in PolicyName}
    for policy, r in placed["policies"].items():
        assert sum(r["outcomes"].values()) == report["requests"]
        assert (
            r["loaded_bytes"] == r["switches"] * placed["model_bytes"]
        )  # every switch moves bytes as placed
        assert device["policies"][policy]["loaded_bytes"] == device["policies"][policy]["switches"] * full
    ratios = report["placement_vs_first"]["host-embeddings"]
    assert set(ratios) == set(placed["policies"])
    assert set(ratios["fastptm"]) == {"switches_fewer", "timeouts_fewer", "goodput_gain"}
    fifo = [
        report["placements"][p]["policies"]["fifo-lru"]["switches"] for p in ("device", "host-embeddings")
    ]
    assert fifo[1] < fifo[0]  # twice the models fit: LRU thrashes less on the same trace


def test_compute_time_does_not_shrink_with_the_placed_bytes() -> None:
    """Only memory changes with placement: with a budget that holds every model either way, each policy
    answers the same requests with the same switches under both placements, and the device's busy time
    differs only by the shorter first loads (a batch computes every group wherever its weights are)."""
    args = _args(
        "--models", "4", "--device-models", "4", "--duration", "20",
        "--placement", "device,host-embeddings", "--host-share", "0.5", "--policies", "fastptm,fifo-lru",
    )  # fmt: skip
    report = trace.run(args)
    runs = report["placements"]
    saved_load_s = 4 * report["model_bytes"] * 0.5 / report["profile"]["host_to_device_bps"]
    for policy in ("fastptm", "fifo-lru"):
        a, b = runs["device"]["policies"][policy], runs["host-embeddings"]["policies"][policy]
        assert a["outcomes"] == b["outcomes"] and a["switches"] == b["switches"] == 4
        assert 0 < a["busy_seconds"] - b["busy_seconds"] <= saved_load_s + 1e-3


def test_unknown_placement_is_refused() -> None:
    with pytest.raises(SystemExit, match="--placement"):
        trace.run(_args("--placement", "device,gpu-only", "--duration", "5"))


def test_host_share_of_host_embeddings_is_the_embeddings_groups_bytes() -> None:
    share, groups = trace_real.host_share("host-embeddings")
    assert groups == ["embeddings"]
    assert share == pytest.approx(_embedding_share(), abs=1e-9)
    assert 0.5 < share < 0.55  # MiniLM-L6: its 30,522 x 384 word table is over half of its bytes


@pytest.mark.slow
def test_auto_in_sim_places_by_a_profile_measured_now() -> None:
    pytest.importorskip("ptmserve.engine.profiling")
    share, groups = trace_real.host_share("auto")
    assert set(groups) <= {"embeddings", *(f"layers.{i}" for i in range(6)), "head"}
    assert (share > 0) == bool(groups)


@pytest.mark.slow
def test_real_mode_gives_the_engine_the_placement_and_its_twin_the_placed_bytes() -> None:
    args = _args(
        "--mode", "real", "--models", "3", "--device-models", "1", "--duration", "3",
        "--placement", "device,host-embeddings", "--policies", "fastptm", "--profile", "cpu-2core",
    )  # fmt: skip
    report = json.loads(json.dumps(trace.run(args)))
    full = trace_real.model_bytes()
    device, placed = report["placements"]["device"], report["placements"]["host-embeddings"]
    assert report["model_bytes"] == device["model_bytes"] == full
    assert placed["host_groups"] == ["embeddings"]
    assert placed["model_bytes"] == pytest.approx(full * (1 - _embedding_share()), abs=1)
    assert placed["models_resident"] >= 2 > device["models_resident"] == 1
    for run in (device, placed):
        r = run["policies"]["fastptm"]
        assert sum(r["outcomes"].values()) == report["requests"]
        assert r["loaded_bytes"] == r["switches"] * run["model_bytes"]  # the engine loaded bytes as placed
        assert (
            run["sim_twin"]["fastptm"]["loaded_bytes"]
            == run["sim_twin"]["fastptm"]["switches"] * run["model_bytes"]
        )


@pytest.mark.slow
def test_real_mode_with_int8_weights_fits_more_models_in_the_same_bytes() -> None:
    args = _args(
        "--mode", "real", "--models", "3", "--device-models", "1", "--duration", "3",
        "--weights", "int8", "--policies", "fastptm", "--profile", "cpu-2core",
    )  # fmt: skip
    report = json.loads(json.dumps(trace.run(args)))
    run = report["placements"]["device"]
    assert run["model_bytes"] < 0.6 * trace_real.model_bytes()  # int8 against bf16
    assert run["models_resident"] >= 2  # the budget of one bf16 model and a half
    r = run["policies"]["fastptm"]
    assert sum(r["outcomes"].values()) == report["requests"]
    assert r["loaded_bytes"] == r["switches"] * run["model_bytes"]


def test_weights_in_sim_mode_are_refused() -> None:
    with pytest.raises(InvalidInput, match="--weights"):
        trace.run(_args("--weights", "int8", "--models", "3", "--duration", "3", "--policies", "fifo-lru"))
