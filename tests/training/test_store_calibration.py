"""The manifest's ``calibration`` field: stored with a model, read back, absent for other models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptmserve.errors import InvalidInput
from ptmserve.store.repository import Repository

CALIBRATION = {"method": "pame", "chosen": {"exits": [0, 2], "thresholds": [0.9, None]}, "rows": {"val": 10}}


def _add(repo: Repository, name: str, **kwargs: object):
    return repo.add_model(
        name,
        config={"family": "bert"},
        pooling={"mode": "mean"},
        tokenizer_json=b"{}",
        dtype="float32",
        tensors={"embeddings.word.weight": torch.ones(2, 2), "layers.0.exit.weight": torch.zeros(3, 2)},
        **kwargs,  # type: ignore[arg-type]
    )


def test_round_trips_through_the_manifest(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    assert _add(repo, "m", calibration=CALIBRATION).calibration == CALIBRATION
    assert Repository(tmp_path / "repo").manifest("m").calibration == CALIBRATION
    assert [e.name for e in repo.manifest("m").entries("layers.0")] == ["layers.0.exit.weight"]


def test_absent_for_other_models_and_old_manifests(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    _add(repo, "plain")
    path = tmp_path / "repo" / "manifests" / "plain.json"
    assert "calibration" not in json.loads(path.read_text())
    assert Repository(tmp_path / "repo").manifest("plain").calibration == {}


def test_refuses_nan_and_infinity_before_writing(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    for bad in ({"x": float("nan")}, {"x": float("inf")}, {"x": object()}):
        with pytest.raises(InvalidInput, match="calibration"):
            _add(repo, "m", calibration=bad)
    assert repo.names() == [] and not list((tmp_path / "repo" / "segments").iterdir())
