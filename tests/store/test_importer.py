"""Importing tiny Hugging Face checkpoints into the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptmserve import errors
from ptmserve.models.config import EncoderConfig
from ptmserve.models.encoder import Encoder
from ptmserve.models.hf import read_checkpoint
from ptmserve.store import Repository
from ptmserve.store.importer import import_checkpoint
from tests.models.tiny import make_tiny_checkpoint
from tests.store import tensors as T


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository(tmp_path / "repo")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_import_round_trip(tmp_path: Path, repo: Repository, family: str) -> None:
    src = make_tiny_checkpoint(tmp_path, family, with_head=True, st_pooling="cls", normalize=True)
    ckpt = read_checkpoint(src)
    m = import_checkpoint(repo, src, "tiny")
    assert m.dtype == "float32"
    assert EncoderConfig.from_dict(m.config) == ckpt.config
    assert m.pooling == ckpt.pooling.to_dict() == {"mode": "cls", "normalize": True}
    assert m.max_length == ckpt.max_length
    assert m.tokenizer_json == (src / "tokenizer.json").read_bytes()
    assert m.group_names() == ["embeddings", "layers.0", "layers.1", "head"]
    T.assert_model(repo, "tiny", ckpt.tensors)
    # The stored tensors load into the encoder strictly (names and shapes match).
    Encoder(ckpt.config).load_state_dict(T.read_all(repo, "tiny"), strict=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_import_casts_floating_tensors(tmp_path: Path, repo: Repository, dtype: str) -> None:
    src = make_tiny_checkpoint(tmp_path, "bert")
    ckpt = read_checkpoint(src)
    m = import_checkpoint(repo, src, "tiny", dtype=dtype)
    assert m.dtype == dtype
    assert {e.dtype for e in m.tensors} == {dtype}
    target = getattr(torch, dtype)
    T.assert_model(repo, "tiny", {k: v.to(target) for k, v in ckpt.tensors.items()})
    assert m.total_bytes * 2 == sum(t.numel() * 4 for t in ckpt.tensors.values())


def test_same_checkpoint_under_two_names_is_stored_once(tmp_path: Path, repo: Repository) -> None:
    src = make_tiny_checkpoint(tmp_path, "bert", with_head=True)
    import_checkpoint(repo, src, "one")
    segs, stored = T.files(repo.root / "segments"), repo.usage().stored_bytes
    import_checkpoint(repo, src, "two")
    assert T.files(repo.root / "segments") == segs
    assert repo.usage().stored_bytes == stored
    assert repo.usage().logical_bytes == 2 * stored


def test_fine_tunes_with_a_frozen_backbone_share_it(tmp_path: Path, repo: Repository) -> None:
    src_a = make_tiny_checkpoint(tmp_path, "bert", with_head=True, name="a")
    src_b = tmp_path / "b"
    shutil.copytree(src_a, src_b)
    weights = load_file(src_b / "model.safetensors")
    weights["classifier.weight"] = weights["classifier.weight"] + 1.0  # a different head
    save_file(weights, src_b / "model.safetensors", metadata={"format": "pt"})
    ma, mb = import_checkpoint(repo, src_a, "a"), import_checkpoint(repo, src_b, "b")
    for g in ("embeddings", "layers.0", "layers.1"):
        assert ma.entries(g) == mb.entries(g)
    # Only the classifier weight changed: the rest of the head is shared too.
    sha = [{e.name: (e.segment, e.offset) for e in m.entries("head")} for m in (ma, mb)]
    assert [k for k in sha[0] if sha[0][k] != sha[1][k]] == ["head.out.weight"]
    out_bytes = sum(e.nbytes for e in ma.entries("head") if e.name == "head.out.weight")
    usage = {u.name: u for u in repo.usage().models}
    assert usage["a"].shared_bytes == usage["b"].shared_bytes == ma.total_bytes - out_bytes
    T.assert_model(repo, "b", read_checkpoint(src_b).tensors)


def test_import_rejects_bad_arguments(tmp_path: Path, repo: Repository) -> None:
    src = make_tiny_checkpoint(tmp_path, "bert")
    with pytest.raises(errors.InvalidInput, match="dtype"):
        import_checkpoint(repo, src, "m", dtype="int8")
    with pytest.raises(errors.InvalidInput, match="invalid model name"):
        import_checkpoint(repo, src, "../m")
    with pytest.raises(errors.InvalidCheckpoint):
        import_checkpoint(repo, tmp_path / "nope", "m")
    assert repo.names() == []
