"""``serve --weights int8``'s repository variant: float models quantized into ``root/variants/int8``, the
source untouched, only changed models converted again, and the variant served by the real Engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptmserve import errors
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from ptmserve.store.variants import sync_variant, variant_root
from tests.models.tiny import make_tiny_checkpoint


@pytest.fixture()
def source(tmp_path: Path) -> Repository:
    repo = Repository(tmp_path / "repo")
    ckpt = make_tiny_checkpoint(tmp_path / "enc", "bert", st_pooling="mean", normalize=True)
    import_checkpoint(repo, ckpt, "enc", "float32")
    import_checkpoint(repo, ckpt, "enc-int4", "float32", weights="int4")
    return repo


def test_the_variant_holds_float_models_quantized_and_quantized_ones_as_stored(source: Repository) -> None:
    variant = sync_variant(source, "int8")
    assert variant.root == variant_root(source.root, "int8")
    assert variant.names() == ["enc", "enc-int4"]
    assert variant.manifest("enc").weights == "int8"
    assert variant.manifest("enc-int4").weights == "int4"  # already quantized: kept as stored
    assert source.manifest("enc").weights == "fp"  # the source is untouched
    assert source.names() == ["enc", "enc-int4"]  # the variants folder is not a model
    assert variant.manifest("enc").total_bytes < 0.4 * source.manifest("enc").total_bytes


def test_only_changed_models_are_converted_again(source: Repository, tmp_path: Path) -> None:
    converted: list[str] = []
    sync_variant(source, "int8", progress=lambda name, done, total: converted.append(name))
    assert converted == ["enc", "enc-int4"]
    converted.clear()
    sync_variant(source, "int8", progress=lambda name, done, total: converted.append(name))
    assert converted == []
    other = make_tiny_checkpoint(tmp_path / "enc2", "bert", st_pooling="cls", normalize=False, seed=3)
    import_checkpoint(source, other, "enc", "float32")  # re-imported
    source.remove("enc-int4")
    variant = sync_variant(source, "int8", progress=lambda name, done, total: converted.append(name))
    assert converted == ["enc"]
    assert variant.names() == ["enc"]


def test_the_engine_serves_the_variant_close_to_float(source: Repository) -> None:
    variant = sync_variant(source, "int8")
    texts = ["hello world", "a longer sentence of several words"]
    with Engine(source, EngineSettings(dtype="float32")) as engine:
        ref = engine.embed("enc", texts).embeddings
    with Engine(variant, EngineSettings(dtype="float32")) as engine:
        got = engine.embed("enc", texts).embeddings
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos


def test_a_float_format_is_refused(source: Repository) -> None:
    with pytest.raises(errors.InvalidInput, match="int8"):
        sync_variant(source, "fp")
