"""Profiles stored next to models: ``Repository.save_profile``, ``profile`` and ``remove``."""

from __future__ import annotations

import pytest

from ptmserve import errors
from ptmserve.store import Repository
from tests.store import tensors as T

DOC = {"version": 1, "model": "m", "groups": [{"name": "embeddings", "device_seconds": [0.5, 1e-7]}]}


@pytest.fixture
def repo(tmp_path) -> Repository:
    repo = Repository(tmp_path / "repo")
    T.add(repo, "m", T.model(0))
    return repo


def test_a_profile_is_saved_replaced_and_read_back(repo: Repository) -> None:
    assert repo.profile("m") is None
    repo.save_profile("m", DOC)
    assert repo.profile("m") == DOC
    assert Repository(repo.root, create=False).profile("m") == DOC  # another process reads the same
    repo.save_profile("m", {**DOC, "model": "again"})
    assert repo.profile("m") == {**DOC, "model": "again"}
    assert sorted(p.name for p in (repo.root / "profiles").iterdir()) == ["m.json"]  # no temp files left
    assert repo.names() == ["m"]


def test_a_re_import_keeps_the_profile_and_remove_deletes_it(repo: Repository) -> None:
    repo.save_profile("m", DOC)
    T.add(repo, "m", T.model(1))  # profiles record the weights they measured; they are not dropped
    assert repo.profile("m") == DOC
    repo.remove("m")
    assert repo.profile("m") is None
    assert not (repo.root / "profiles" / "m.json").exists()
    T.add(repo, "n", T.model(2))
    repo.remove("n")  # a model without a profile is removed as before


def test_only_stored_models_get_profiles_of_strict_json(repo: Repository) -> None:
    with pytest.raises(errors.ModelNotFound, match="'x'"):
        repo.save_profile("x", DOC)
    with pytest.raises(errors.InvalidInput, match="strict JSON"):
        repo.save_profile("m", {"t": float("nan")})
    with pytest.raises(errors.InvalidInput, match="strict JSON"):
        repo.save_profile("m", {"t": object()})
    with pytest.raises(errors.InvalidInput):
        repo.save_profile("../m", DOC)
    with pytest.raises(errors.InvalidInput):
        repo.profile("../m")
    assert repo.profile("m") is None


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_malformed_profile_is_corrupt_data_naming_the_model(repo: Repository, content: bytes) -> None:
    repo.save_profile("m", DOC)
    (repo.root / "profiles" / "m.json").write_bytes(content)
    with pytest.raises(errors.CorruptData, match="profile of model 'm'"):
        repo.profile("m")
    repo.save_profile("m", DOC)  # a new profile replaces the damaged one
    assert repo.profile("m") == DOC
