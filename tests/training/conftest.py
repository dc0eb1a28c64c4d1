"""A tiny BERT in a temporary repository and a synthetic dataset whose class is set by its words."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import WORDS, make_tiny_checkpoint

CLASS_WORDS = {"sport": WORDS[0:40], "music": WORDS[40:80]}


def write_words_dataset(
    path: Path, rows: int = 160, seed: int = 0, labels: dict[str, str] | None = None
) -> Path:
    """``rows`` texts of 6 to 12 words, each drawn from its class's word set (``labels`` renames
    classes)."""
    rng = np.random.default_rng(seed)
    names = sorted(CLASS_WORDS)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "topic"])
        for i in range(rows):
            label = names[i % 2]
            words = rng.choice(CLASS_WORDS[label], size=int(rng.integers(6, 13)))
            w.writerow([" ".join(words), (labels or {}).get(label, label)])
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("exits-ckpt")
    return {
        "base": make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=3, name="base"),
        "cls": make_tiny_checkpoint(src, "bert", with_head=True, num_labels=2, seed=4, name="cls"),
    }


@pytest.fixture
def repo(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> Repository:
    """A repository holding ``base`` (a tiny BERT, mean pooling) and ``cls`` (a tiny BERT classifier)."""
    r = Repository(tmp_path / "models")
    import_checkpoint(r, tiny_checkpoints["base"], "base")
    import_checkpoint(r, tiny_checkpoints["cls"], "cls")
    return r
