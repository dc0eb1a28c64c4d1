"""The engine end to end on real tiny models: the worker loop, the scheduler, the weight tiers."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ptmserve import errors
from ptmserve.engine.api import InferenceOptions, ModelKind, ModelState
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.models.encoder import Encoder
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.packed import pack
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import TINY_TEXTS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "emb": make_tiny_checkpoint(root / "emb", "bert"),
        "cls": make_tiny_checkpoint(root / "cls", "roberta", with_head=True),
        "dist": make_tiny_checkpoint(root / "dist", "distilbert", with_head=True),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Repository:
    repo = Repository(tmp_path_factory.mktemp("repo"))
    for name, src in checkpoints.items():
        import_checkpoint(repo, src, name, dtype="float32")
    return repo


@pytest.fixture(scope="module")
def engine(repo: Repository) -> Engine:
    with Engine(repo, EngineSettings(dtype="float32")) as engine:
        yield engine


def reference(src: Path, texts: list[str], classify: bool = False) -> np.ndarray:
    """The same model run directly, outside the engine, one input at a time."""
    ckpt = read_checkpoint(src)
    model = Encoder(ckpt.config).eval()
    model.load_state_dict(ckpt.tensors, strict=True)
    from ptmserve.models.tokenizer import TextTokenizer

    tok = TextTokenizer.from_json(ckpt.tokenizer_json, min(ckpt.max_length, ckpt.config.max_tokens))
    rows = []
    with torch.inference_mode():
        for ids in tok.encode(texts):
            batch = pack([ids], position_offset=ckpt.config.position_offset)
            out = model(batch, ckpt.pooling)
            rows.append((out.logits if classify else out.embeddings)[0].numpy())
    return np.stack(rows)


def test_models_describe_the_repository(engine: Engine) -> None:
    infos = {m.name: m for m in engine.models()}
    assert set(infos) == {"emb", "cls", "dist"}
    assert infos["emb"].kind is ModelKind.EMBEDDING and infos["emb"].labels == ()
    assert infos["cls"].kind is ModelKind.CLASSIFIER and len(infos["cls"].labels) == 3
    assert all(m.state is ModelState.READY and m.dtype == "float32" for m in infos.values())


def test_batched_engine_matches_single_direct_runs(engine: Engine, checkpoints: dict[str, Path]) -> None:
    texts = list(TINY_TEXTS)
    got = engine.embed("emb", texts).embeddings
    np.testing.assert_allclose(got, reference(checkpoints["emb"], texts), atol=1e-5)
    result = engine.classify("cls", texts)
    want = reference(checkpoints["cls"], texts, classify=True)
    np.testing.assert_allclose(result.logits, want, atol=1e-5)
    labels = engine.model_info("cls").labels
    assert result.labels == [labels[i] for i in want.argmax(axis=1)]


def test_concurrent_callers_each_get_their_own_rows(engine: Engine) -> None:
    texts = list(TINY_TEXTS) * 4
    alone = {t: engine.embed("emb", [t]).embeddings[0] for t in set(texts)}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: engine.embed("emb", [t]).embeddings[0], texts))
    for text, row in zip(texts, results, strict=True):
        np.testing.assert_allclose(row, alone[text], atol=1e-5)


def test_token_ids_are_used_as_given(engine: Engine) -> None:
    info = engine.model_info("emb")
    ids = [[2, 10, 11, 3], [2, 12, 3]]
    out = engine.embed("emb", ids)
    assert out.embeddings.shape == (2, info.dim) and out.prompt_tokens == 7


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ([], "non-empty list"),
        ([""], "empty string"),
        ([[]], "no tokens"),
        ([[1, 10**9]], "token id"),
        ([1.5], "token"),
    ],
)
def test_bad_input_is_refused_clearly(engine: Engine, inputs: list, needle: str) -> None:
    with pytest.raises(errors.InvalidInput, match=needle):
        engine.embed("emb", inputs)


def test_unknown_model_and_missing_head(engine: Engine) -> None:
    with pytest.raises(errors.ModelNotFound):
        engine.embed("nope", ["hello"])
    with pytest.raises(errors.InvalidInput):
        engine.embed("../etc", ["hello"])
    with pytest.raises(errors.InvalidInput, match="classification head"):
        engine.classify("emb", ["hello"])


def test_long_text_is_truncated_to_the_model_maximum(engine: Engine) -> None:
    info = engine.model_info("emb")
    out = engine.embed("emb", [" ".join(["word"] * (info.max_tokens * 3))])
    assert out.prompt_tokens == info.max_tokens


def test_a_one_microsecond_timeout_fails_as_deadline_exceeded(engine: Engine) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        engine.embed("emb", ["hello"], InferenceOptions(priority=1, timeout_us=1))
    outcome = engine.metrics.requests.labels("emb", "timeout")._value.get()
    assert outcome >= 1


def test_async_calls_and_cancellation(engine: Engine) -> None:
    async def main() -> None:
        out = await engine.aembed("emb", ["hello"])
        assert out.embeddings.shape[0] == 1
        task = asyncio.ensure_future(engine.aembed("emb", ["bye"] * 4))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        out = await engine.aclassify("dist", list(TINY_TEXTS))
        assert len(out.labels) == len(TINY_TEXTS)

    asyncio.run(main())


def test_explicit_model_control(repo: Repository) -> None:
    with Engine(repo, EngineSettings(dtype="float32", model_control="explicit")) as engine:
        assert engine.model_info("emb").state is ModelState.UNAVAILABLE
        with pytest.raises(errors.NotReady):
            engine.embed("emb", ["hello"])
        engine.load("emb")
        assert engine.model_info("emb").state is ModelState.READY
        assert engine.embed("emb", ["hello"]).embeddings.shape[0] == 1
        engine.unload("emb")
        with pytest.raises(errors.NotReady):
            engine.embed("emb", ["hello"])


def test_close_drains_then_refuses(repo: Repository) -> None:
    engine = Engine(repo, EngineSettings(dtype="float32"))
    futures = [engine._submit("emb", [t], InferenceOptions(), classify=False) for t in TINY_TEXTS]
    engine.close()
    assert all(f.result().embeddings.shape[0] == 1 for f in futures)
    with pytest.raises(errors.NotReady):
        engine.embed("emb", ["hello"])


def test_mixed_classes_over_more_models_than_fit_each_end_in_one_outcome(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    """Six models, a device budget of two: every request ends exactly once, counters agree."""
    repo = Repository(tmp_path / "repo")
    names = [f"m{i}" for i in range(6)]
    for i, name in enumerate(names):
        import_checkpoint(repo, checkpoints["emb" if i % 2 else "dist"], name, dtype="float32")
    one_model = max(repo.manifest(n).total_bytes for n in names)
    settings = EngineSettings(dtype="float32", device_memory=2 * one_model + 1024, max_queue=8)
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def call(i: int) -> None:
        name = rng.choice(names)
        options = InferenceOptions(priority=rng.choice([1, 2]), timeout_us=rng.choice([0, 200, 2_000_000]))
        try:
            engine.embed(name, [rng.choice(TINY_TEXTS)], options)
            key = "success"
        except errors.DeadlineExceeded:
            key = "timeout"
        except errors.Overloaded:
            key = "rejected"
        with lock:
            outcomes[key] = outcomes.get(key, 0) + 1

    with Engine(repo, settings) as engine, ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(200)))
        counted = {
            key: sum(engine.metrics.requests.labels(n, key)._value.get() for n in names)
            for key in ("success", "timeout", "rejected", "error")
        }
        device = engine.weights.stats().device
        assert device.used_bytes <= 2 * one_model + 1024
        assert 0 < engine.metrics.resident_bytes.labels("device")._value.get() <= 2 * one_model + 1024
    assert sum(outcomes.values()) == 200
    assert outcomes.get("success", 0) > 0
    assert counted["error"] == 0
    assert {k: int(v) for k, v in counted.items() if v} == outcomes


def test_a_model_larger_than_the_device_budget_is_refused_at_startup(repo: Repository) -> None:
    small = min(repo.manifest(n).total_bytes for n in repo.names())
    with Engine(repo, EngineSettings(dtype="float32", device_memory=small // 2)) as engine:
        info = engine.model_info("emb")
        assert info.state is ModelState.UNAVAILABLE and "budget" in info.reason
        with pytest.raises(errors.NotReady, match="budget"):
            engine.embed("emb", ["hello"])
