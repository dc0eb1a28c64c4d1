"""Serving models with early exits: the engine, the runner's per-request permissions, the exits metric, and
cold pipelined loads (exit heads arrive with their layer; rows that all left wait for no later layer)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ptmserve.engine.api import InferenceOptions, ModelKind
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.engine.requests import Request, RequestClass
from ptmserve.engine.runner import ModelRunner, Work
from ptmserve.engine.scheduler import Step, StepKind
from ptmserve.errors import InvalidInput
from ptmserve.memory.manager import WeightManager
from ptmserve.models.encoder import Encoder
from ptmserve.models.exits import EarlyExit
from ptmserve.models.packed import pack
from ptmserve.store.repository import Repository
from tests.memory.helpers import GatedRepo
from tests.models.tiny import TINY_TEXTS
from tests.models.tiny_exits import POOLING, read_model, store_exit_suite, tokenize

TEXTS = [*TINY_TEXTS, "the water is hot", "we can make a new house", "big animal"]
LAST = 3  # the tiny models have 4 layers


@dataclass(frozen=True)
class Models:
    repo: Repository
    leaves: list[bool]  # which of TEXTS leave "half" at layer 2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """``base`` (no exits), ``half`` (exits after layers 1 and 2; half of TEXTS leave at 2) and ``all1``
    (every input leaves at layer 1)."""
    repo = Repository(tmp_path_factory.mktemp("repo"))
    return Models(repo, store_exit_suite(repo, TEXTS))


@pytest.fixture(scope="module")
def engine(models: Models) -> Iterator[Engine]:
    with Engine(models.repo, EngineSettings(dtype="float32")) as engine:
        yield engine


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def exits_counted(engine: Engine, model: str, layer: int) -> float:
    value = engine.metrics.registry.get_sample_value(
        "ptmserve_exits_total", {"model": model, "layer": str(layer)}
    )
    return value or 0.0


def test_exit_models_are_classifiers_listing_their_exits(engine: Engine) -> None:
    info = engine.model_info("half")
    assert info.kind is ModelKind.CLASSIFIER and info.exits == (1, 2) and len(info.labels) == 3
    assert engine.model_info("base").exits == ()


def test_each_input_gets_the_answer_it_gets_alone(engine: Engine, models: Models) -> None:
    result = engine.classify("half", TEXTS)
    assert result.exit_layers is not None and result.exit_layers.dtype == np.int32
    assert result.exit_layers.tolist() == [2 if x else LAST for x in models.leaves]
    for i, text in enumerate(TEXTS):
        alone = engine.classify("half", [text])
        assert alone.exit_layers is not None and alone.exit_layers.tolist() == [result.exit_layers[i]]
        assert alone.labels == [result.labels[i]]
        np.testing.assert_allclose(softmax(alone.logits), softmax(result.logits[i : i + 1]), atol=1e-5)
        assert alone.embeddings is not None and result.embeddings is not None
        np.testing.assert_allclose(alone.embeddings[0], result.embeddings[i], atol=1e-5)


def test_early_exit_false_forces_full_depth(engine: Engine) -> None:
    forced = engine.classify("half", TEXTS, InferenceOptions(early_exit=False))
    plain = engine.classify("base", TEXTS)
    assert forced.exit_layers is not None and forced.exit_layers.tolist() == [LAST] * len(TEXTS)
    assert plain.exit_layers is None
    np.testing.assert_array_equal(forced.logits, plain.logits)  # the same weights and batch: bit-identical
    np.testing.assert_array_equal(forced.embeddings, plain.embeddings)
    with pytest.raises(InvalidInput, match="early_exit"):
        InferenceOptions(early_exit="no")  # type: ignore[arg-type]


def test_embeddings_of_an_exit_model_are_full_depth(engine: Engine) -> None:
    np.testing.assert_array_equal(
        engine.embed("half", TEXTS).embeddings, engine.embed("base", TEXTS).embeddings
    )


def test_the_exits_metric_counts_every_classified_input(engine: Engine, models: Models) -> None:
    before = {layer: exits_counted(engine, "half", layer) for layer in (1, 2, LAST)}
    engine.classify("half", TEXTS)
    engine.classify("half", TEXTS[:2], InferenceOptions(early_exit=False))
    engine.embed("half", TEXTS)  # not classified: not counted
    leaving = sum(models.leaves)
    assert exits_counted(engine, "half", 2) - before[2] == leaving
    assert exits_counted(engine, "half", LAST) - before[LAST] == len(TEXTS) - leaving + 2
    assert exits_counted(engine, "half", 1) == before[1] == 0
    engine.classify("all1", TEXTS[:3])
    # every input left early, so the answer came before the step ended and published its counts
    deadline = time.monotonic() + 5
    while exits_counted(engine, "all1", 1) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert exits_counted(engine, "all1", 1) == 3
    assert exits_counted(engine, "base", LAST) == 0


def test_one_step_honours_each_requests_permission(engine: Engine, models: Models) -> None:
    """Three requests in one batch: may exit, full depth, embeddings only. Each gets its own rows."""
    runner = ModelRunner(engine.weights, engine.catalog, engine.device, engine.generation)
    ids = tokenize(TEXTS)
    works = [Work(ids, True), Work(ids, True, early_exit=False), Work(ids, False)]
    batch = [
        Request(
            id=i + 1, model="half", cls=RequestClass.BATCH, arrival=0.0, deadline=1e9, tokens=1, payload=w
        )
        for i, w in enumerate(works)
    ]
    tokens = 3 * sum(len(x) for x in ids)
    step = Step(1, "half", batch, [], False, [], [], 0.0, tokens, StepKind.BATCH)
    out = runner.execute(step)
    assert out.error is None and out.exec_seconds > 0
    assert out.exit_layers[1].tolist() == [2 if x else LAST for x in models.leaves]
    assert out.exit_layers[2].tolist() == [LAST] * len(ids) and 3 not in out.exit_layers
    full = engine.classify("base", TEXTS)
    np.testing.assert_allclose(out.logits[2], full.logits, atol=1e-5)
    np.testing.assert_allclose(out.embeddings[3], engine.embed("base", TEXTS).embeddings, atol=1e-5)


def test_a_cold_pipelined_engine_answers_an_exit_model_correctly(models: Models) -> None:
    config, tensors = read_model(models.repo, "half")
    enc = Encoder.from_tensors(config, tensors)
    with Engine(models.repo, EngineSettings(dtype="float32", pipelined=True)) as cold:
        assert not cold.weights.residency("half").on_device
        result = cold.classify("half", TEXTS)
    assert result.exit_layers is not None
    assert result.exit_layers.tolist() == [2 if x else LAST for x in models.leaves]
    with torch.inference_mode():
        want = enc(pack(tokenize(TEXTS), position_offset=0), POOLING)
    assert want.exit_layers is not None and want.logits is not None
    assert want.exit_layers.tolist() == result.exit_layers.tolist()
    np.testing.assert_allclose(result.logits, want.logits.numpy(), atol=1e-5)


def test_a_cold_load_answers_inputs_that_all_left_before_later_layers_are_read(models: Models) -> None:
    """The exit heads of layer 1 load with layer 1; once every row has left there, the run returns while
    layer 2 is still held back by the repository."""
    gated = GatedRepo(models.repo, timeout=20.0)
    gate = gated.gate("all1", "layers.2")
    manager = WeightManager(
        models.repo, device="cpu", dtype=None, host_budget="64MiB", device_budget="64MiB", pipelined=True
    )
    manager._repo = gated  # type: ignore[assignment]
    ids = tokenize(TEXTS[:3])
    try:
        with manager.acquire("all1") as loaded:
            early_exit = EarlyExit()
            acts = loaded.run(pack(ids, position_offset=0), classify=True, early_exit=early_exit)
            layer2_read_first = ("all1", "layers.2") in gated.reads
            gate.set()
            loaded.wait()
    finally:
        gate.set()
        manager.close()
    assert not layer2_read_first and gated.opened_in_time[("all1", "layers.2")] is True
    assert ("all1", "layers.1") in gated.reads
    assert early_exit.layers is not None and early_exit.layers.tolist() == [1, 1, 1]
    config, tensors = read_model(models.repo, "all1")
    with torch.inference_mode():
        want = Encoder.from_tensors(config, tensors)(pack(ids, position_offset=0), POOLING)
    assert acts.logits is not None and want.logits is not None
    assert torch.equal(acts.logits, want.logits) and torch.equal(acts.embeddings, want.embeddings)


def test_a_request_whose_inputs_all_left_is_answered_before_its_step_ends(models: Models) -> None:
    """One step: A's inputs all leave at layer 2, B runs to full depth. While layer 3 is still held back
    by the repository (B waits for it), A is already answered, with what it gets alone."""
    gated = GatedRepo(models.repo, timeout=20.0)
    gate = gated.gate("half", "layers.3")
    with Engine(models.repo, EngineSettings(dtype="float32", pipelined=True)) as engine:
        engine.weights._repo = gated  # type: ignore[assignment]  # the cold load reads through the gate
        leaving = [t for t, leaves in zip(TEXTS, models.leaves, strict=True) if leaves]
        answered: list[bool] = []
        runner = engine._runner
        answer = runner.early_answer
        assert answer is not None

        def answer_then_open(req, *part) -> None:  # noqa: ANN001
            answer(req, *part)
            answered.append(req.payload.future.done() and not gate.is_set())
            gate.set()  # now let B's last layer load

        runner.early_answer = answer_then_open
        a = engine._submit("half", leaving, InferenceOptions(priority=2), classify=True)
        b = engine._submit("half", TEXTS[:2], InferenceOptions(priority=2, early_exit=False), classify=True)
        result_a, result_b = a.result(30), b.result(30)
    assert answered == [True]
    assert result_a.exit_layers.tolist() == [2] * len(leaving)
    assert result_b.exit_layers.tolist() == [LAST, LAST]
    assert gated.opened_in_time[("half", "layers.3")] is True
