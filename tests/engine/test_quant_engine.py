"""Models imported with ``--weights int8`` / ``int4`` served by the real Engine: an encoder from a Hugging
Face folder and a decoder from a GGUF file, with the tier metrics counting the quantized bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptmserve.engine.api import GenerationParams
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.test_gguf import write_tiny_gguf
from tests.models.tiny import make_tiny_checkpoint

FORMATS = ("fp", "int8", "int4")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp("quant-engine")
    repo = Repository(root / "repo")
    encoder = make_tiny_checkpoint(root / "enc", "bert", st_pooling="mean", normalize=True)
    decoder = write_tiny_gguf(root / "tiny.gguf").path
    for weights in FORMATS:
        import_checkpoint(repo, encoder, f"enc-{weights}", "float32", weights=weights)
        import_checkpoint(repo, Path(decoder), f"dec-{weights}", weights=weights)
    with Engine(repo, EngineSettings(dtype="float32")) as engine:
        yield engine


def tier_bytes(engine: Engine, model: str) -> dict[str, int]:
    return {t.name: t.per_model.get(model, 0) for t in engine.tiers() if t.name in ("host", "device")}


def test_a_quantized_encoder_embeds_close_to_fp32(engine: Engine) -> None:
    texts = ["hello world", "a longer sentence of several words", "x"]
    ref = engine.embed("enc-fp", texts).embeddings
    for weights in ("int8", "int4"):
        got = engine.embed(f"enc-{weights}", texts).embeddings
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > (0.99 if weights == "int8" else 0.9), (weights, cos)
    fp = tier_bytes(engine, "enc-fp")
    for weights in ("int8", "int4"):
        q = tier_bytes(engine, f"enc-{weights}")
        assert all(0.1 < q[t] / fp[t] < 0.4 for t in fp), (weights, q, fp)


def test_a_quantized_decoder_generates(engine: Engine) -> None:
    params = GenerationParams(temperature=0, max_tokens=6, ignore_eos=True)
    for weights in FORMATS:
        result = engine.complete(f"dec-{weights}", "Hello world", params).result(60)
        assert result.completion_tokens == 6, weights
    fp = tier_bytes(engine, "dec-fp")
    q = tier_bytes(engine, "dec-int8")
    assert q["device"] < 0.5 * fp["device"], (q, fp)
