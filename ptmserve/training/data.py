"""The labelled data of ``train-exits``: a CSV file read with the standard library, and its split.

Every error names the file, the data row (1-based, the header is not counted) with its line, and the
column, so a user can find the bad cell.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptmserve.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class LabelledData:
    """Texts with their class, in file order."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]  # the class names, in logit order
    y: np.ndarray  # (N,) int64 index into ``labels``
    source: str  # the file's name (never its folder), for messages and the stored calibration

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> dict[str, int]:
        """Rows per class."""
        found = np.bincount(self.y, minlength=len(self.labels))
        return {label: int(n) for label, n in zip(self.labels, found, strict=True)}


@dataclass(frozen=True, slots=True)
class Split:
    """Row indices of the training and validation parts (each sorted)."""

    train: np.ndarray  # (N_train,) int64
    val: np.ndarray  # (N_val,) int64


def read_csv(
    path: str | Path, text_column: str, label_column: str, *, labels: Sequence[str] = ()
) -> LabelledData:
    """Read ``path`` (UTF-8, a header row, then one row per example).

    Args:
        path: the CSV file.
        text_column: the column holding the text.
        label_column: the column holding the class name.
        labels: the classes in logit order when they are fixed already (a base model with a
            classification head); every row's class must be one of them. Empty: the classes found,
            sorted.

    Raises:
        InvalidInput: a missing or empty file, a missing column, an empty text or label, an unknown
            class, an undecodable line, or fewer than two classes.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise InvalidInput(f"no data file {str(path)!r}")
    texts: list[str] = []
    names: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise InvalidInput(f"{name} is empty: expected a header row naming the columns")
            for column, what in ((text_column, "--text-column"), (label_column, "--label-column")):
                if column not in header:
                    raise InvalidInput(f"{name} has no column {column!r} ({what}); its columns: {header}")
            line = reader.line_num
            for row_no, row in enumerate(reader, start=1):
                where = f"{name} row {row_no} (line {line + 1})"
                line = reader.line_num
                texts.append(_cell(row, text_column, where, "text"))
                names.append(_cell(row, label_column, where, "label"))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name} is not UTF-8 after line {reader.line_num}: {exc.reason}") from None
    except csv.Error as exc:
        raise InvalidInput(f"{name} line {reader.line_num} is not valid CSV: {exc}") from None
    if not texts:
        raise InvalidInput(f"{name} has a header but no data rows")
    return LabelledData(tuple(texts), *_classes(names, labels, name, label_column), name)


def _cell(row: dict[str | None, str | list[str] | None], column: str, where: str, what: str) -> str:
    value = row.get(column)
    if value is None:
        raise InvalidInput(f"{where} has no value in column {column!r} (the row is short)")
    assert isinstance(value, str)
    if not value.strip():
        raise InvalidInput(f"{where} has an empty {what} in column {column!r}")
    return value if what == "text" else value.strip()


def _classes(
    names: list[str], fixed: Sequence[str], source: str, column: str
) -> tuple[tuple[str, ...], np.ndarray]:
    if fixed:
        index = {label: i for i, label in enumerate(fixed)}
        for row_no, label in enumerate(names, start=1):
            if label not in index:
                raise InvalidInput(
                    f"{source} row {row_no} has class {label!r} in column {column!r}, which the base "
                    f"model's head does not know; its classes: {list(fixed)}"
                )
        labels = tuple(fixed)
    else:
        labels = tuple(sorted(set(names)))
        index = {label: i for i, label in enumerate(labels)}
    if len(set(names)) < 2:
        raise InvalidInput(
            f"{source} has a single class ({names[0]!r} in column {column!r}); a classifier needs at "
            "least two"
        )
    return labels, np.array([index[n] for n in names], dtype=np.int64)


def stratified_split(data: LabelledData, val_fraction: float, seed: int) -> Split:
    """Put ``val_fraction`` of each class (at least one row) in the validation part, the rest in the
    training part; the same data, fraction and seed give the same split.

    Raises:
        InvalidInput: ``val_fraction`` outside (0, 1), or a class with too few rows to have a row in
            each part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInput(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c, label in enumerate(data.labels):
        rows = np.flatnonzero(data.y == c)
        if len(rows) == 0:
            continue  # a class of the base model's head that the data does not have
        n_val = max(1, round(len(rows) * val_fraction))
        if len(rows) - n_val < 1:
            raise InvalidInput(
                f"{data.source}: class {label!r} has {len(rows)} row(s), too few for a training and a "
                f"validation part at --val-fraction {val_fraction} (each needs at least one row)"
            )
        rows = rng.permutation(rows)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))
