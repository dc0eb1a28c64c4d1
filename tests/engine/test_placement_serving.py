"""The engine under ``--placement``: same answers, fewer device bytes, more models per device budget."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ptmserve.engine.api import GenerationParams
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.memory.placement import ModelProfile
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import TINY_TEXTS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    root = tmp_path_factory.mktemp("placement")
    repo = Repository(root / "repo")
    for name, family in (("a", "bert"), ("b", "roberta")):
        import_checkpoint(
            repo, make_tiny_checkpoint(root / name, family, with_head=True), name, dtype="float32"
        )
    return repo


def group_bytes(repo: Repository, model: str, group: str) -> int:
    return sum(e.nbytes for e in repo.manifest(model).entries(group))


def model_bytes(repo: Repository, model: str) -> int:
    return sum(e.nbytes for e in repo.manifest(model).tensors)


def device_bytes_of(engine: Engine, model: str) -> int:
    return next(t for t in engine.tiers() if t.name == "device").per_model[model]


def test_host_embeddings_answer_the_same_with_fewer_device_bytes(repo: Repository) -> None:
    texts = list(TINY_TEXTS)
    with Engine(repo, EngineSettings(dtype="float32")) as full:
        want = full.classify("a", texts)
        assert device_bytes_of(full, "a") == model_bytes(repo, "a")
    with Engine(repo, EngineSettings(dtype="float32", placement="host-embeddings")) as placed:
        got = placed.classify("a", texts)
        saved = group_bytes(repo, "a", "embeddings")
        assert device_bytes_of(placed, "a") == model_bytes(repo, "a") - saved
        assert placed.catalog.device_bytes("a") == model_bytes(repo, "a") - saved  # what the scheduler counts
        assert placed.catalog.weight_bytes("a") == model_bytes(repo, "a")  # what it computes with
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    np.testing.assert_array_equal(got.logits, want.logits)


def test_a_device_budget_too_small_for_two_full_models_keeps_two_placed_ones(repo: Repository) -> None:
    placed = {m: model_bytes(repo, m) - group_bytes(repo, m, "embeddings") for m in ("a", "b")}
    budget = sum(placed.values())
    assert max(model_bytes(repo, m) for m in placed) <= budget < sum(model_bytes(repo, m) for m in placed)
    switches = {}
    for placement in ("device", "host-embeddings"):
        settings = EngineSettings(dtype="float32", device_memory=budget, placement=placement)
        with Engine(repo, settings) as engine:
            for _ in range(3):
                for model in ("a", "b"):
                    engine.embed(model, ["one text"])
        loads = engine.metrics.loads  # read once closed: a load's event may trail its last group's compute
        switches[placement] = sum(loads.labels(m)._value.get() for m in ("a", "b"))
    assert switches == {"device": 6, "host-embeddings": 2}


def test_auto_profiles_a_model_in_the_background_and_places_by_its_profile(
    repo: Repository, tmp_path: Path
) -> None:
    pytest.importorskip("ptmserve.engine.profiling")
    with Engine(repo, EngineSettings(dtype="float32", placement="auto")) as engine:
        engine.embed("b", ["one text"])  # no profile yet: placed like host-embeddings meanwhile
        assert device_bytes_of(engine, "b") == model_bytes(repo, "b") - group_bytes(repo, "b", "embeddings")
        deadline = time.monotonic() + 60
        while "b" not in engine.placement.profiled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.placement.profiled == ["b"]  # only the model in use
    doc = repo.profile("b")
    assert doc is not None
    profile = ModelProfile.from_dict(doc)
    assert [g.name for g in profile.groups] == repo.manifest("b").group_names()
    with Engine(repo, EngineSettings(dtype="float32", placement="auto")) as engine:
        assert engine.placement.profile(repo.manifest("b")) == profile  # stored: not measured again
        engine.embed("b", ["one text"])
        assert engine.placement.profiled == []


@pytest.mark.parametrize("variant", ["llama-tied", "llama-gqa-untied"])
def test_a_tied_lm_head_keeps_the_embedding_table_on_the_device(tmp_path: Path, variant: str) -> None:
    from tests.models.tiny_decoder import make_tiny_decoder

    repo = Repository(tmp_path / "repo")
    folder, _ = make_tiny_decoder(tmp_path / "ck", variant)
    import_checkpoint(repo, folder, "dec", dtype="float32")
    outputs, device_bytes = {}, {}
    for placement in ("device", "host-embeddings"):
        with Engine(repo, EngineSettings(dtype="float32", placement=placement)) as engine:
            outputs[placement] = (
                engine.complete("dec", [5, 6, 7], GenerationParams(max_tokens=6, temperature=0.0))
                .result()
                .text
            )
            device_bytes[placement] = device_bytes_of(engine, "dec")
            assert engine.catalog.device_bytes("dec") == device_bytes[placement]
    assert outputs["device"] == outputs["host-embeddings"]
    saved = device_bytes["device"] - device_bytes["host-embeddings"]
    assert saved == (0 if variant == "llama-tied" else group_bytes(repo, "dec", "embeddings"))


def test_the_background_profile_waits_for_an_idle_engine(tmp_path: Path) -> None:
    import threading

    import torch

    from ptmserve.engine.placement import Placement

    repo = Repository(tmp_path / "repo")
    import_checkpoint(repo, make_tiny_checkpoint(tmp_path / "ck", "bert"), "m", dtype="float32")
    idle = threading.Event()
    placement = Placement(repo, "auto", torch.device("cpu"), torch.float32, idle=idle.is_set)
    try:
        placement(repo.manifest("m"))  # no profile yet: placed like host-embeddings
        placement.loaded("m")
        time.sleep(0.5)
        assert placement.profiled == [] and repo.profile("m") is None  # the engine is busy
        idle.set()
        deadline = time.monotonic() + 30
        while not placement.profiled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert placement.profiled == ["m"] and repo.profile("m") is not None
    finally:
        placement.close()
