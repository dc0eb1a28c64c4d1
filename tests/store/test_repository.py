"""Repository round trips, deduplication, names, usage and removal."""

from __future__ import annotations

import json

import pytest
import torch

from ptmserve import errors
from ptmserve.store import Repository
from ptmserve.store.manifest import group_order_key
from tests.store import tensors as T


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository(tmp_path / "repo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(repo: Repository, dtype: torch.dtype) -> None:
    tensors = T.model(0, dtype=dtype)
    tensors["embeddings.position.weight"][3, 5] = float("nan")  # NaN payload bytes survive too
    dtype_name = str(dtype).removeprefix("torch.")
    name = f"m-{dtype_name}"
    m = T.add(repo, name, tensors, dtype=dtype_name)
    assert m.group_names() == ["embeddings", "layers.0", "layers.1", "head"]
    assert m.dtype == dtype_name
    assert m.config == T.CONFIG and m.pooling == T.POOLING and m.tokenizer_json == T.TOKENIZER
    assert m.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    T.assert_model(repo, name, tensors)
    # A fresh instance (another process) reads the same thing from disk.
    T.assert_model(Repository(repo.root, create=False), name, tensors)


def test_odd_tensors_round_trip(repo: Repository) -> None:
    tensors = {
        "embeddings.scale": torch.tensor(2.5),  # 0-d
        "embeddings.ids": torch.arange(7, dtype=torch.int64),
        "embeddings.mask": torch.tensor([True, False, True]),
        "embeddings.empty": torch.empty(0, 4),
        "embeddings.strided": torch.randn(6, 4).t(),  # not contiguous
        "layers.0.w": torch.randn(3, 5),
    }
    T.add(repo, "odd", tensors)
    T.assert_model(repo, "odd", tensors)


def test_groups_are_in_execution_order(repo: Repository) -> None:
    tensors = {f"layers.{i}.w": torch.full((2,), float(i)) for i in (10, 2, 0, 1)}
    tensors |= {"head.w": torch.ones(2), "embeddings.w": torch.zeros(2)}
    m = T.add(repo, "order", tensors)
    assert m.group_names() == ["embeddings", "layers.0", "layers.1", "layers.2", "layers.10", "head"]
    assert sorted(["head", "layers.10", "layers.9", "embeddings"], key=group_order_key) == [
        "embeddings",
        "layers.9",
        "layers.10",
        "head",
    ]
    assert [e.name for e in repo.group_entries("order", "layers.10")] == ["layers.10.w"]
    with pytest.raises(errors.InvalidInput, match="no layer group"):
        repo.read_group("order", "layers.3")


def test_same_checkpoint_twice_is_stored_once(repo: Repository) -> None:
    tensors = T.model(0)
    T.add(repo, "first", tensors)
    segs = T.files(repo.root / "segments")
    before = repo.usage()
    T.add(repo, "second", {k: v.clone() for k, v in tensors.items()})
    after = repo.usage()
    assert T.files(repo.root / "segments") == segs  # no segment written
    assert after.stored_bytes == before.stored_bytes
    assert after.disk_bytes == before.disk_bytes
    assert after.logical_bytes == 2 * before.logical_bytes
    assert {m.name: m.shared_bytes for m in after.models} == {
        "first": before.logical_bytes,
        "second": before.logical_bytes,
    }
    assert repo.manifest("first").tensors == repo.manifest("second").tensors
    T.assert_model(repo, "second", tensors)


def test_fine_tunes_share_the_frozen_backbone(repo: Repository) -> None:
    a, b = T.model(0, head_seed=1), T.model(0, head_seed=2)
    ma, mb = T.add(repo, "ft-a", a), T.add(repo, "ft-b", b)
    for g in ("embeddings", "layers.0", "layers.1"):
        assert ma.entries(g) == mb.entries(g)  # same segment and offset: stored once
    assert {e.segment for e in ma.entries("head")}.isdisjoint(e.segment for e in mb.entries("head"))
    # The second import wrote one segment: its head.
    assert len(T.files(repo.root / "segments")) == 3 + 2 + 1  # backbone groups, heads, tokenizer
    backbone_bytes = sum(t.numel() * 4 for t in T.backbone(0).values())
    usage = {m.name: m for m in repo.usage().models}
    assert usage["ft-a"].shared_bytes == backbone_bytes == usage["ft-b"].shared_bytes
    assert repo.usage().stored_bytes == backbone_bytes + 2 * sum(t.numel() * 4 for t in T.head(1).values())
    T.assert_model(repo, "ft-a", a)
    T.assert_model(repo, "ft-b", b)


def test_tied_weights_are_stored_once(repo: Repository) -> None:
    tensors = T.model(0)
    tensors["head.decoder.weight"] = tensors["embeddings.word.weight"].clone()
    m = T.add(repo, "tied", tensors)
    (emb,) = [e for e in m.entries("embeddings") if e.name == "embeddings.word.weight"]
    (dec,) = [e for e in m.entries("head") if e.name == "head.decoder.weight"]
    assert (emb.segment, emb.offset) == (dec.segment, dec.offset)
    usage = repo.usage()
    assert usage.logical_bytes - usage.stored_bytes == emb.nbytes
    T.assert_model(repo, "tied", tensors)


def test_segments_are_aligned_and_coalesced(repo: Repository) -> None:
    m = T.add(repo, "m", T.model(0))
    for e in m.tensors:
        assert e.offset % 64 == 0
    # One segment per group on a fresh repository, so each group is one sequential read.
    for g in m.group_names():
        assert len({e.segment for e in m.entries(g)}) == 1


def test_read_into_fills_preallocated_buffers(repo: Repository) -> None:
    tensors = T.model(0, dtype=torch.bfloat16)
    T.add(repo, "m", tensors, dtype="bfloat16")
    entries = repo.group_entries("m", "layers.1")
    out = {e.name: torch.empty(e.shape, dtype=torch.bfloat16) for e in entries}
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    repo.read_into(entries, out, model="m")
    assert {k: v.data_ptr() for k, v in out.items()} == ptrs
    assert all(T.same_bytes(out[e.name], tensors[e.name]) for e in entries)
    # A flat byte buffer of the right size works too; a wrong size is refused.
    flat = {e.name: torch.empty(e.nbytes, dtype=torch.uint8) for e in entries}
    repo.read_into(entries, flat)
    assert all(
        T.same_bytes(flat[e.name].view(torch.bfloat16).view(e.shape), tensors[e.name]) for e in entries
    )
    bad = dict(out)
    bad[entries[0].name] = torch.empty(1, dtype=torch.bfloat16)
    with pytest.raises(errors.InvalidInput, match="bytes"):
        repo.read_into(entries, bad)


def test_reimport_replaces_and_gc_frees_old_segments(repo: Repository) -> None:
    T.add(repo, "m", T.model(0))
    other = Repository(repo.root)
    assert other.manifest("m").tensors  # cached in the other instance
    new = T.model(5)
    T.add(repo, "m", new)
    T.assert_model(other, "m", new)  # the other instance notices the replaced manifest
    report = repo.gc()
    assert report.removed_segments == 4 and report.freed_bytes > 0
    assert repo.usage().stored_bytes == repo.usage().logical_bytes
    assert repo.verify() == []


def test_remove_frees_unshared_segments_only(repo: Repository) -> None:
    a, b = T.model(0, head_seed=1), T.model(0, head_seed=2)
    T.add(repo, "a", a)
    T.add(repo, "b", b)
    repo.remove("a")
    assert repo.names() == ["b"]
    with pytest.raises(errors.ModelNotFound):
        repo.manifest("a")
    T.assert_model(repo, "b", b)
    assert len(T.files(repo.root / "segments")) == 3 + 1 + 1
    with pytest.raises(errors.ModelNotFound):
        repo.remove("a")


@pytest.mark.parametrize(
    "bad", ["", "../evil", "a/b", ".hidden", "-x", "a b", "x" * 129, "name\n", "ok\x00", "é", "a\\b"]
)
def test_bad_names_are_rejected(repo: Repository, bad: str) -> None:
    with pytest.raises(errors.InvalidInput, match="invalid model name"):
        T.add(repo, bad, T.model(0))
    with pytest.raises(errors.InvalidInput):
        repo.manifest(bad)
    with pytest.raises(errors.InvalidInput):
        repo.read_group(bad, "embeddings")
    assert list((repo.root / "manifests").iterdir()) == []


def test_good_names_and_unknown_models(repo: Repository) -> None:
    for name in ("a", "all-MiniLM-L6-v2", "x" * 128, "v1.2_final"):
        T.add(repo, name, T.model(0))
    assert repo.names() == sorted(["a", "all-MiniLM-L6-v2", "x" * 128, "v1.2_final"])
    for call in (repo.manifest, repo.segment_paths, repo.verify, lambda n: repo.read_group(n, "head")):
        with pytest.raises(errors.ModelNotFound):
            call("missing")


def test_bad_inputs_are_rejected(repo: Repository) -> None:
    with pytest.raises(errors.InvalidInput, match="dtype"):
        T.add(repo, "m", T.model(0), dtype="int8")
    with pytest.raises(errors.InvalidInput, match="layer index"):
        T.add(repo, "m", {"layers.w": torch.ones(1)})
    with pytest.raises(errors.InvalidInput, match="at least one"):
        T.add(repo, "m", {})
    with pytest.raises(errors.InvalidInput, match="JSON"):
        T.add(repo, "m", T.model(0), config={"x": object()})
    with pytest.raises(errors.InvalidInput, match="cannot be stored"):
        T.add(repo, "m", {"head.w": torch.ones(2, dtype=torch.complex64)})
    assert repo.names() == []


def test_manifest_is_plain_json_on_disk(repo: Repository) -> None:
    T.add(repo, "m", T.model(0))
    doc = json.loads((repo.root / "manifests" / "m.json").read_text())
    assert doc["format"] == 1 and doc["name"] == "m"
    entry = doc["groups"][0]["tensors"][0]
    assert set(entry) == {"name", "dtype", "shape", "sha256", "segment", "offset", "nbytes"}
    assert all(p.stat().st_size > 0 for p in repo.segment_paths("m"))
    assert len(repo.segment_paths("m")) == 5  # 4 groups + tokenizer


def test_missing_root_without_create(tmp_path) -> None:
    with pytest.raises(errors.InvalidConfig, match="does not exist"):
        Repository(tmp_path / "nope", create=False)


def test_generation_settings_round_trip_through_the_manifest(tmp_path) -> None:

    repo = Repository(tmp_path / "repo")
    settings = {"chat_template": "{{ messages }}", "eos_token_id": 2, "eos_token": "</s>"}
    stored = repo.add_model(
        "dec",
        config={"family": "bert"},
        pooling={},
        tokenizer_json=b"{}",
        dtype="float32",
        tensors={"embeddings.word.weight": torch.zeros(4, 2)},
        generation=settings,
    )
    assert stored.generation == settings
    assert Repository(tmp_path / "repo").manifest("dec").generation == settings
