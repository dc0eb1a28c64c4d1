"""An import killed with SIGKILL at any point leaves a consistent repository.

Each case runs a real import in a subprocess that kills itself at a deterministic point (see
crash_import.py). A fresh 4-group model with a new tokenizer does 6 durable renames: 4 segments,
the tokenizer blob, then the manifest (the commit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ptmserve.store import Repository, fsio
from tests.store import tensors as T

ROOT = Path(__file__).resolve().parents[2]
RENAMES = 6


def _run(repo: Path, name: str, seed: int, mode: str, n: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.store.crash_import", str(repo), name, str(seed), mode, str(n)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def repo(tmp_path) -> Repository:
    repo = Repository(tmp_path / "repo")
    T.add(repo, "base", T.model(0, head_seed=1))
    T.add(repo, "other", T.model(0, head_seed=2))
    return repo


def _referenced(repo: Repository) -> set[str]:
    return {f"{s}.seg" for n in repo.names() for s in repo.manifest(n).segment_ids()}


def _assert_old_models_intact(repo: Repository) -> None:
    fresh = Repository(repo.root)  # what a restarted server would see
    assert fresh.names() == ["base", "other"]
    assert fresh.verify() == []
    T.assert_model(fresh, "base", T.model(0, head_seed=1))
    T.assert_model(fresh, "other", T.model(0, head_seed=2))


def test_an_import_does_the_expected_renames(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash points below assume this count (checked in-process, with the same patch point)."""
    renamed: list[str] = []
    real = fsio.rename_durable

    def rename(src: Path, dst: Path) -> None:
        renamed.append(dst.parent.name)
        real(src, dst)

    monkeypatch.setattr(fsio, "rename_durable", rename)
    T.add(repo, "fresh", T.model(5), tokenizer=b'{"seed": 5}')
    assert renamed == ["segments"] * (RENAMES - 1) + ["manifests"]
    T.assert_model(Repository(repo.root), "fresh", T.model(5))


@pytest.mark.parametrize(
    ("mode", "n", "orphans"),
    [
        ("rename", 1, 0),  # first segment written to a temp file, not yet renamed
        ("rename", 3, 2),  # two segments published
        ("rename", RENAMES, 5),  # all segments and the tokenizer published, manifest not renamed
        ("write", 2, 1),  # second segment half written
    ],
)
def test_killed_import_leaves_repository_consistent(
    repo: Repository, mode: str, n: int, orphans: int
) -> None:
    before = T.files(repo.root / "segments")
    proc = _run(repo.root, "fresh", 5, mode, n)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)

    _assert_old_models_intact(repo)
    segs = T.files(repo.root / "segments")
    assert before <= segs and len(segs - before) == orphans
    assert len(list((repo.root / "tmp").iterdir())) == 1  # the write in progress

    report = Repository(repo.root).gc()
    assert (report.removed_segments, report.removed_temp) == (orphans, 1)
    assert T.files(repo.root / "segments") == _referenced(repo) == before
    assert list((repo.root / "tmp").iterdir()) == []
    _assert_old_models_intact(repo)

    # The import can simply be run again.
    T.add(repo, "fresh", T.model(5), tokenizer=b'{"seed": 5}')
    assert repo.verify() == []
    T.assert_model(repo, "fresh", T.model(5))


def test_killed_reimport_keeps_the_old_version(repo: Repository) -> None:
    proc = _run(repo.root, "base", 7, "rename", RENAMES)  # replacing 'base', killed before the commit
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _assert_old_models_intact(repo)
    # The next import's gc clears the leftovers before writing.
    T.add(repo, "third", T.model(0, head_seed=1))
    assert T.files(repo.root / "segments") == _referenced(repo)
    assert repo.verify() == []
