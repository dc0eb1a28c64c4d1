"""Profiles of stored models (``engine/profiling.py``): what is measured, stored and reused, and that
``auto`` placement follows the stored profile. Tiny random models in a temp repository."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ptmserve import errors
from ptmserve.engine import profiling
from ptmserve.memory.placement import AUTO, ModelProfile, host_groups
from ptmserve.models import registry
from ptmserve.models.config import ExitSpec
from ptmserve.store.repository import Repository
from tests.memory.helpers import add_model, tiny_config
from tests.models.tiny_exits import store_tiny_classifier, store_with_exits

SHAPES = ((1, 4), (3, 8))  # tiny batches: the tests are about what is measured, not how fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo")


def store_decoder(repo: Repository, name: str, architecture: str, config: dict, seed: int = 0) -> None:
    """Store a random decoder of ``architecture`` (registry config dict ``config``) as ``name``."""
    family = registry.get(architecture)
    cfg = family.config_from_dict(config)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in family.build(cfg).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen) * 0.2 for n, s in shapes.items()}
    repo.add_model(
        name,
        config=cfg.to_dict(),
        pooling={},
        tokenizer_json=b"{}",
        dtype="float32",
        tensors=tensors,
        architecture=architecture,
        group_order=family.group_names(cfg),
    )


LLAMA_TIED = {
    "vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": True,
}  # fmt: skip
GPT2 = {
    "vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
    "max_position_embeddings": 64,
}  # fmt: skip


def test_an_encoder_profile_has_each_load_group_with_its_bytes_and_times(repo: Repository) -> None:
    store_tiny_classifier(repo, "cls", layers=2)
    manifest = repo.manifest("cls")
    p = profiling.profile_model(repo, "cls", device="cpu", dtype="float32", shapes=SHAPES, repeats=2)
    assert (
        [g.name for g in p.groups] == manifest.group_names() == ["embeddings", "layers.0", "layers.1", "head"]
    )
    assert (p.model, p.device, p.dtype, p.shapes) == ("cls", "cpu", "float32", SHAPES)
    assert p.weights_id == profiling.manifest_weights_id(manifest)
    for g in p.groups:
        assert g.bytes == sum(e.nbytes for e in manifest.entries(g.name)) > 0
        assert g.shared_bytes == 0
        assert all(t > 0 for t in g.device_seconds + g.host_seconds)
        assert g.transfer_seconds == (0.0, 0.0)  # the CPU serving the stored dtype: used in place


def test_bytes_are_in_the_serve_dtype_and_casts_are_transfers(repo: Repository) -> None:
    add_model(repo, "emb", tiny_config(layers=1))
    manifest = repo.manifest("emb")
    p = profiling.profile_model(repo, "emb", device="cpu", dtype=torch.bfloat16, shapes=((2, 4),), repeats=1)
    assert p.dtype == "bfloat16"
    assert [g.bytes for g in p.groups] == [
        sum(e.nbytes for e in manifest.entries(g)) // 2 for g in ("embeddings", "layers.0")
    ]
    assert all(g.transfer_seconds[0] > 0 for g in p.groups)  # float32 host copy <-> bfloat16 activations


def test_long_shapes_are_capped_at_the_models_longest_input(repo: Repository) -> None:
    add_model(repo, "emb", tiny_config(layers=1, max_positions=32))
    p = profiling.profile_model(repo, "emb", dtype=None, shapes=((1, 8), (2, 1000), (2, 500)), repeats=1)
    assert p.shapes == ((1, 8), (2, 32)) and p.dtype == "float32"


def test_a_profile_is_stored_and_reloaded_equal(repo: Repository) -> None:
    add_model(repo, "emb", tiny_config())
    p = profiling.profile_model(repo, "emb", dtype="float32", shapes=SHAPES, repeats=1)
    repo.save_profile("emb", p.to_dict())
    assert profiling.stored_profile(repo, "emb") == p
    assert profiling.stored_profile(Repository(repo.root, create=False), "emb") == p


def test_ensure_profile_reuses_a_matching_profile_and_measures_again_when_the_weights_change(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []
    measure = profiling.profile_model

    def counted(repo: Repository, name: str, **kw: object) -> ModelProfile:
        calls.append((name, bool(kw.get("quick"))))
        return measure(repo, name, **{**kw, "shapes": SHAPES, "repeats": 1})  # type: ignore[arg-type]

    monkeypatch.setattr(profiling, "profile_model", counted)
    add_model(repo, "emb", tiny_config(), seed=1)
    first = profiling.ensure_profile(repo, "emb", device="cpu", dtype="float32")
    assert calls == [("emb", True)] and profiling.stored_profile(repo, "emb") == first
    assert profiling.ensure_profile(repo, "emb", device="cpu", dtype="float32") == first
    assert len(calls) == 1

    add_model(repo, "emb", tiny_config(), seed=2)  # re-imported with other weights
    second = profiling.ensure_profile(repo, "emb", device="cpu", dtype="float32")
    assert len(calls) == 2 and second.weights_id != first.weights_id
    assert second.weights_id == profiling.manifest_weights_id(repo.manifest("emb"))
    assert profiling.stored_profile(repo, "emb") == second

    third = profiling.ensure_profile(repo, "emb", device="cpu", dtype="bfloat16")  # another serve dtype
    assert len(calls) == 3 and third.dtype == "bfloat16"

    (repo.root / "profiles" / "emb.json").write_text("{broken")  # damaged: measured again, not fatal
    assert profiling.ensure_profile(repo, "emb", device="cpu", dtype="bfloat16").dtype == "bfloat16"
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("architecture", "config", "shared"),
    [("llama", LLAMA_TIED, {"embeddings.word.weight"}), ("gpt2", GPT2, {"embeddings.word.weight"})],
)
def test_a_tied_lm_head_makes_the_embedding_table_shared(
    repo: Repository, architecture: str, config: dict, shared: set[str]
) -> None:
    store_decoder(repo, "dec", architecture, config)
    manifest = repo.manifest("dec")
    p = profiling.profile_model(repo, "dec", dtype="float32", shapes=SHAPES, repeats=1)
    assert [g.name for g in p.groups] == ["embeddings", "layers.0", "layers.1", "head"]
    emb = p.group("embeddings")
    assert emb is not None and emb.shared_bytes == sum(
        e.nbytes for e in manifest.entries("embeddings") if e.name in shared
    )
    if architecture == "llama":
        assert emb.shared_bytes == emb.bytes and emb.saved_bytes == 0  # nothing to save on the host
    assert all(g.shared_bytes == 0 for g in p.groups if g.name != "embeddings")
    assert all(t > 0 for g in p.groups for t in g.device_seconds + g.host_seconds)


def test_an_untied_decoder_shares_nothing(repo: Repository) -> None:
    store_decoder(repo, "dec", "llama", {**LLAMA_TIED, "tie_word_embeddings": False})
    p = profiling.profile_model(repo, "dec", dtype="float32", shapes=((2, 20),), repeats=1)
    assert all(g.shared_bytes == 0 for g in p.groups)


def test_a_model_with_exits_is_profiled_at_full_depth(repo: Repository) -> None:
    store_tiny_classifier(repo, "base", layers=3)
    store_with_exits(repo, "base", "fast", [ExitSpec(0, 0.0), ExitSpec(1, 0.0)])  # every row would leave
    p = profiling.profile_model(repo, "fast", dtype="float32", shapes=SHAPES, repeats=1)
    assert [g.name for g in p.groups] == ["embeddings", "layers.0", "layers.1", "layers.2", "head"]
    assert all(t > 0 for g in p.groups for t in g.device_seconds + g.host_seconds)


def test_auto_placement_follows_the_stored_profile(repo: Repository) -> None:
    add_model(repo, "emb", tiny_config(layers=2))
    measured = profiling.profile_model(repo, "emb", dtype="float32", shapes=SHAPES, repeats=1)
    groups = [g.name for g in measured.groups]

    def stored(**edits: dict) -> ModelProfile:
        """``measured`` with some groups edited, stored and read back (what the engine would see)."""
        edited = [dataclasses.replace(g, **edits.get(g.name.replace(".", "_"), {})) for g in measured.groups]
        repo.save_profile("emb", dataclasses.replace(measured, groups=tuple(edited)).to_dict())
        p = profiling.stored_profile(repo, "emb")
        assert p is not None
        return p

    n = len(SHAPES)
    tiny, big = (1e-6,) * n, 10**9
    # a layer that holds most bytes and costs almost nothing anywhere goes to the host
    cheap_layer = {"bytes": big, "device_seconds": tiny, "host_seconds": tiny}
    assert "layers.1" in host_groups(AUTO, groups, stored(layers_1=cheap_layer))
    # embeddings that compute far slower from the host stay on the device, however big
    slow = {"bytes": big, "device_seconds": tiny, "host_seconds": (100.0,) * n}
    assert "embeddings" not in host_groups(AUTO, groups, stored(embeddings=slow))
    # ... and so do embeddings whose bytes another group needs (a tied head)
    tied = {"bytes": big, "shared_bytes": big, "device_seconds": tiny, "host_seconds": tiny}
    assert "embeddings" not in host_groups(AUTO, groups, stored(embeddings=tied))
    assert host_groups(AUTO, groups, stored(embeddings={**tied, "shared_bytes": 0})) == {"embeddings"}
    assert host_groups("device", groups, stored()) == frozenset()


def test_a_malformed_stored_profile_is_corrupt_data_naming_the_model(repo: Repository) -> None:
    add_model(repo, "emb", tiny_config())
    repo.save_profile("emb", {"version": 1, "shapes": [[1, 2]]})
    with pytest.raises(errors.CorruptData, match="model 'emb'"):
        profiling.stored_profile(repo, "emb")
    assert profiling.stored_profile(repo, "emb-missing") is None
