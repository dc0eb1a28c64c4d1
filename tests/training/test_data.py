"""The labelled CSV: each bad-data case gets an error that names the row and the column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptmserve.errors import InvalidInput
from ptmserve.training.data import read_csv, stratified_split


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(InvalidInput) as info:
        read_csv(path, "text", "label", **kwargs)  # type: ignore[arg-type]
    return info.value.message


def test_reads_texts_and_sorted_classes(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'text,label\n"hello, world",b\n"two\nlines",a\nthird,b\n')
    data = read_csv(path, "text", "label")
    assert data.texts == ("hello, world", "two\nlines", "third")
    assert data.labels == ("a", "b") and data.y.tolist() == [1, 0, 1]
    assert data.counts() == {"a": 1, "b": 2} and data.source == "data.csv"


def test_fixed_labels_keep_their_order(tmp_path: Path) -> None:
    data = read_csv(_csv(tmp_path, "text,label\nx,b\ny,a\n"), "text", "label", labels=("b", "a", "c"))
    assert data.labels == ("b", "a", "c") and data.y.tolist() == [0, 1]


def test_missing_file(tmp_path: Path) -> None:
    assert "no data file" in _error(tmp_path / "absent.csv")


def test_empty_file(tmp_path: Path) -> None:
    assert "data.csv is empty" in _error(_csv(tmp_path, ""))


def test_header_only(tmp_path: Path) -> None:
    assert "no data rows" in _error(_csv(tmp_path, "text,label\n"))


def test_missing_column(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "body,label\nx,a\n"))
    assert "no column 'text' (--text-column)" in message and "['body', 'label']" in message


def test_empty_text_names_row_and_column(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "text,label\nfine,a\n  ,b\n"))
    assert "row 2 (line 3)" in message and "empty text in column 'text'" in message


def test_empty_label_names_row_and_column(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "text,label\nfine,a\nalso fine,\n"))
    assert "row 2" in message and "empty label in column 'label'" in message


def test_short_row(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "text,label\nfine,a\nno label here\n"))
    assert "row 2" in message and "no value in column 'label'" in message


def test_single_class(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "text,label\nx,a\ny,a\n"))
    assert "single class ('a' in column 'label')" in message


def test_unknown_class_of_a_fixed_head(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "text,label\nx,a\ny,z\n"), labels=("a", "b"))
    assert "row 2 has class 'z' in column 'label'" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\ncaf\xe9,a\n")
    assert "not UTF-8" in _error(path)


def test_too_few_rows_for_the_split(tmp_path: Path) -> None:
    data = read_csv(_csv(tmp_path, "text,label\nx,a\ny,a\nz,b\n"), "text", "label")
    with pytest.raises(InvalidInput, match="class 'b' has 1 row"):
        stratified_split(data, 0.2, 0)
    with pytest.raises(InvalidInput, match="--val-fraction"):
        stratified_split(data, 1.0, 0)


def test_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    rows = "".join(f"t{i},{'a' if i % 4 else 'b'}\n" for i in range(100))
    data = read_csv(_csv(tmp_path, "text,label\n" + rows), "text", "label")
    one, two = stratified_split(data, 0.2, 7), stratified_split(data, 0.2, 7)
    assert np.array_equal(one.val, two.val) and np.array_equal(one.train, two.train)
    assert not set(one.val) & set(one.train) and len(one.val) + len(one.train) == 100
    assert np.bincount(data.y[one.val]).tolist() == [15, 5]  # 20% of 75 a's and of 25 b's
    assert not np.array_equal(stratified_split(data, 0.2, 8).val, one.val)
