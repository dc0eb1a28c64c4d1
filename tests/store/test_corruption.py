"""Damaged segments: verify reports them per model, loads refuse them, other models keep working."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ptmserve import errors
from ptmserve.store import Repository
from ptmserve.store.manifest import TensorEntry
from tests.store import tensors as T


@pytest.fixture
def repo(tmp_path) -> Repository:
    """'a' and 'b' share a backbone (different heads); 'c' shares nothing."""
    repo = Repository(tmp_path / "repo")
    T.add(repo, "a", T.model(0, head_seed=1))
    T.add(repo, "b", T.model(0, head_seed=2))
    T.add(repo, "c", T.model(3), tokenizer=b'{"c": true}')
    assert repo.verify() == []
    return repo


def _entry(repo: Repository, model: str, tensor: str) -> TensorEntry:
    (e,) = [e for e in repo.manifest(model).tensors if e.name == tensor]
    return e


def _path(repo: Repository, e: TensorEntry) -> Path:
    return repo.root / "segments" / f"{e.segment}.seg"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_flipped_byte_in_unshared_tensor(repo: Repository) -> None:
    e = _entry(repo, "a", "head.out.weight")
    _flip(_path(repo, e), e.offset + 5)
    problems = repo.verify()
    assert [(p.model, p.kind, p.group, p.tensor) for p in problems] == [("a", "checksum", "head", e.name)]
    assert "'a'" in problems[0].message and str(_path(repo, e)) in problems[0].message
    assert repo.verify("b") == [] and repo.verify("c") == []
    with pytest.raises(errors.CorruptData) as exc:
        repo.read_group("a", "head")
    for part in ("'a'", "'head'", "'head.out.weight'", f"segments/{_path(repo, e).name}"):
        assert part in exc.value.message
    assert str(repo.root) not in exc.value.message  # clients never see the server's file system
    # The same group of a model with its own head, and the shared backbone, still load.
    T.assert_model(repo, "b", T.model(0, head_seed=2))
    assert repo.read_group("a", "layers.0")
    # verify=False skips the hash (for bytes the caller verified before): no error, wrong bytes.
    got = repo.read_group("a", "head", verify=False)
    assert not T.same_bytes(got[e.name], T.head(1)[e.name])


def test_flipped_byte_in_shared_tensor_affects_every_sharer(repo: Repository) -> None:
    e = _entry(repo, "a", "layers.1.ffn.in.weight")
    _flip(_path(repo, e), e.offset + e.nbytes - 1)
    problems = repo.verify()
    assert sorted((p.model, p.kind, p.tensor) for p in problems) == [
        ("a", "checksum", e.name),
        ("b", "checksum", e.name),
    ]
    for model in ("a", "b"):
        with pytest.raises(errors.CorruptData, match="layers.1.ffn.in.weight"):
            repo.read_group(model, "layers.1")
        out = {x.name: torch.empty(x.shape) for x in repo.group_entries(model, "layers.1")}
        with pytest.raises(errors.CorruptData, match="checksum"):
            repo.read_into(repo.group_entries(model, "layers.1"), out, model=model)
    T.assert_model(repo, "c", T.model(3))


def test_truncated_segment(repo: Repository) -> None:
    e = _entry(repo, "c", "layers.1.ffn.out.weight")
    path = _path(repo, e)
    os.truncate(path, path.stat().st_size - 100)
    problems = repo.verify()
    assert {p.model for p in problems} == {"c"}
    assert {p.kind for p in problems} == {"truncated"}
    assert e.name in {p.tensor for p in problems}
    for verify in (True, False):  # a short file is refused even without hashing
        with pytest.raises(errors.CorruptData, match="truncated") as exc:
            repo.read_group("c", "layers.1", verify=verify)
        assert "'c'" in exc.value.message and f"segments/{path.name}" in exc.value.message
        assert str(repo.root) not in exc.value.message
    out = {x.name: torch.empty(x.shape) for x in repo.group_entries("c", "layers.1")}
    with pytest.raises(errors.CorruptData, match="truncated"):
        repo.read_into(repo.group_entries("c", "layers.1"), out, verify=False)
    assert repo.read_group("c", "layers.0")
    T.assert_model(repo, "a", T.model(0, head_seed=1))


def test_missing_segment_and_tokenizer(repo: Repository) -> None:
    e = _entry(repo, "c", "embeddings.word.weight")
    _path(repo, e).unlink()
    problems = repo.verify()
    assert {(p.model, p.kind, p.group) for p in problems} == {("c", "missing", "embeddings")}
    with pytest.raises(errors.CorruptData, match="missing"):
        repo.read_group("c", "embeddings")
    tok = repo.manifest("c").tokenizer
    _flip(repo.root / "segments" / f"{tok.segment}.seg", 2)
    fresh = Repository(repo.root)  # no cached manifest
    assert ("c", "checksum", "tokenizer.json") in {(p.model, p.kind, p.tensor) for p in fresh.verify()}
    with pytest.raises(errors.CorruptData, match="tokenizer"):
        fresh.manifest("c")
    assert fresh.manifest("a").tokenizer_json == T.TOKENIZER


def test_reimport_repairs_a_damaged_copy(repo: Repository) -> None:
    e = _entry(repo, "a", "layers.0.attn.qkv.weight")
    _flip(_path(repo, e), e.offset)
    T.add(repo, "a2", T.model(0, head_seed=1))  # must not reuse the damaged bytes
    assert repo.verify("a2") == []
    T.assert_model(repo, "a2", T.model(0, head_seed=1))
    assert {p.model for p in repo.verify()} == {"a", "b"}


def test_unreadable_manifest_is_reported_and_gc_keeps_segments(repo: Repository) -> None:
    (repo.root / "manifests" / "c.json").write_text("{ not json")
    problems = repo.verify()
    assert [(p.model, p.kind) for p in problems] == [("c", "manifest")]
    with pytest.raises(errors.CorruptData, match="manifest of model 'c' is not valid JSON") as exc:
        repo.manifest("c")
    assert str(repo.root) not in exc.value.message
    before = T.files(repo.root / "segments")
    report = repo.gc()
    assert report.kept_segments and report.removed_segments == 0
    assert T.files(repo.root / "segments") == before
    T.assert_model(repo, "a", T.model(0, head_seed=1))
